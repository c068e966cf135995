"""The nagging tools (.ci/run runs them): the import-layer contract, the private-name rule and the
type check hold on the tree, and each one fails on a module that breaks it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data_loaders", "jobs", "serve", "cluster")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: in a copy of the tree, its packages come before the editable install's
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env={"PATH": str(BIN), "PYTHONPATH": str(cwd)}
    )


def _copy_of_the_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest)
    return dest


@pytest.mark.timeout(120)
def test_the_tree_keeps_its_import_layers():
    done = _run([_tool("lint-imports"), "--no-cache"], ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.timeout(120)
def test_an_import_across_the_layers_breaks_the_contract(tmp_path):
    tree = _copy_of_the_tree(tmp_path)
    # imports inside functions count: that is how the layers were crossed before
    (tree / "serve" / "probe.py").write_text(
        "def f():\n    from jobs.train import train\n\n    return train\n"
    )
    (tree / "data_loaders" / "probe.py").write_text(
        "def f():\n    import serve.app\n\n    return serve.app\n"
    )
    (tree / "models" / "probe.py").write_text("import ray\n")
    done = _run([_tool("lint-imports"), "--no-cache"], tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 broken" in done.stdout, done.stdout
    assert "serve.probe -> jobs.train" in done.stdout
    assert "data_loaders.probe -> serve.app" in done.stdout
    assert "models.probe -> ray" in done.stdout


@pytest.mark.timeout(60)
def test_cluster_and_serve_reach_jobs_through_public_names_only(tmp_path):
    tree = _copy_of_the_tree(tmp_path)
    probe = "def f():\n    from jobs.cli import _metrics_table\n\n    return _metrics_table\n"
    for package in ("cluster", "serve", "jobs"):
        (tree / package / "probe.py").write_text(probe)
    done = _run([_tool("ruff"), "check", "--no-cache", "--output-format", "json", "."], tree)
    assert done.returncode == 1, done.stdout + done.stderr
    found = json.loads(done.stdout)
    flagged = sorted(
        Path(f["filename"]).relative_to(tree).as_posix() for f in found if f["code"] == "PLC2701"
    )
    assert flagged == ["cluster/probe.py", "serve/probe.py"], found


@pytest.mark.timeout(600)  # a first run reads torch's and transformers' types (minutes); then seconds
def test_the_core_type_checks():
    done = _run([_tool("mypy")], ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues found" in done.stdout


@pytest.mark.timeout(60)
def test_the_type_check_reports_a_type_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def flavour() -> str:\n    return 3\n")
    done = _run(
        [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", str(bad)], ROOT
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[return-value]" in done.stdout
