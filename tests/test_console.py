"""What `deepfleet train` prints: deepfleet's own lines (setup, progress, one line per validation,
the final table); Ray's log lines, the workers' output and library warnings go to the run's
logs/ folder, and `--verbose` shows them as well."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, ROOT

RECIPE = str(CONFIGS / "retinopathy.yaml")
# Ray's and the libraries' lines, as they look when they reach a console
NOISE = re.compile(r"\bINFO\b|Warning|Reporting training result|\((RayTrainWorker|SplitCoordinator) pid=")


def _train(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", RECIPE, "--profile", "tiny", "--address", address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )


@pytest.mark.timeout(900)
def test_train_prints_deepfleets_own_lines_and_verbose_adds_the_rest(ray_local, retinopathy_cli, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    # the README's main job: the tiny recipe as it ships (6 epochs, a validation each), a fresh run
    lines = [ln for ln in retinopathy_cli["console"].splitlines() if ln.strip()]
    print("\n".join(lines))
    assert len(lines) <= 40, "\n".join(lines)
    assert not [ln for ln in lines if NOISE.search(ln)], "\n".join(lines)
    assert sum(ln.startswith("validation after epoch") for ln in lines) == 6, "\n".join(lines)
    logs = retinopathy_cli["run_dir"] / "logs"
    assert "Reporting training result" in (logs / "worker-0.log").read_text()

    # --verbose: the same lines reach the console; `--name off` names the run "off" (on 160 images)
    data = ["--set", f"data.root={tmp_path / 'data'}", "--set", "data.num_images=160"]
    runs = ["--output-dir", str(tmp_path / "runs"), "--name", "off", "--set", "train.max_steps=2"]
    loud = _train(address, *data, *runs, "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Reporting training result" in loud.stdout + loud.stderr
    assert (tmp_path / "runs" / "off" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "off" / "logs" / "worker-0.log").exists()
