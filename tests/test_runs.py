"""A run directory has one writer and one model: a run started again with another task, model or
data is refused before anything in it changes, and a live run's name is refused naming its pid
(jobs.train.same_run, jobs.storage.Lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, cli_env
from tests.test_cli import deepfleet, one_line_error


def _snapshot(folder: Path) -> dict:
    """Every file of a run but its lock (which names whoever last held it)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


def _again(run_dir: Path, recipe: str, *sets: str):
    """`deepfleet train` of the README main job's run name, with other settings."""
    config = str(CONFIGS / f"{recipe}.yaml")
    args = ["--profile", "tiny", "--output-dir", str(run_dir.parent), "--name", run_dir.name]
    return deepfleet("train", config, *args, *[x for s in sets for x in ("--set", s)])


@pytest.mark.timeout(300)
def test_a_run_started_again_with_another_model_task_or_data_is_refused_untouched(
    retinopathy_cli, tiny_data, tmp_path
):
    run_dir = retinopathy_cli["run_dir"]
    before = _snapshot(run_dir)
    data = f"data.root={tiny_data}"

    line = one_line_error(_again(run_dir, "retinopathy", data, "model.dropout=0.5", "model.hidden=256"))
    assert f"run {run_dir} was trained with another model.dropout, model.hidden" in line, line
    assert "--set run.allow_changes=true" in line
    line = one_line_error(_again(run_dir, "autonomous", f"data.root={tmp_path / 'auto'}"))
    assert "another task (retinopathy, not autonomous)" in line, line
    # the same recipe on other data (fewer images): its fingerprint differs
    line = one_line_error(
        _again(run_dir, "retinopathy", f"data.root={tmp_path / 'other'}", "data.num_images=120")
    )
    assert "another data (fingerprint" in line, line
    assert _snapshot(run_dir) == before  # nothing in the run changed


@pytest.mark.timeout(120)
def test_allow_changes_lets_a_run_go_on_with_another_model(tmp_path):
    from jobs.config import load_recipe, save_recipe
    from jobs.errors import UserError
    from jobs.train import same_run

    sets = [f"run.output_dir={tmp_path}", "model.dropout=0.1"]
    first = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", sets)
    save_recipe(first, first.run_dir / "config.yaml")
    other = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", [*sets, "model.dropout=0.3"])
    with pytest.raises(UserError, match="another model.dropout"):
        same_run(other)
    allowed = load_recipe(
        CONFIGS / "retinopathy.yaml", "tiny", [*sets, "model.dropout=0.3", "run.allow_changes=true"]
    )
    assert same_run(allowed).model.dropout == 0.1  # the run's old recipe, and no refusal
    longer = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", [*sets, "train.epochs=9"])
    assert same_run(longer) is not None  # a longer budget is how a run goes on


HOLDER = """
import sys, time
from jobs.storage import Lock
from jobs.train import RUN_LOCK
with Lock(None, sys.argv[1] + "/" + RUN_LOCK, "run"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.timeout(180)
def test_a_second_train_of_a_live_run_is_refused_naming_its_pid(tmp_path):
    run_dir = tmp_path / "runs" / "live"
    run_dir.mkdir(parents=True)
    # the run's lock held by another live process, as a `deepfleet train` of it holds it
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(_again(run_dir, "retinopathy", f"data.root={tmp_path / 'data'}"))
        assert f"run {run_dir} is in use by pid {holder.pid} on " in line, line
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "config.yaml").exists()
