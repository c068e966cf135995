"""One Ray cluster for the whole session; tiny recipes; every test has a timeout (pyproject)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from cluster.local import connect

    connect()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny retinopathy recipe's data, generated once per session."""
    from jobs import tasks
    from jobs.config import load_recipe

    root = tmp_path_factory.mktemp("data") / "retinopathy-tiny"
    recipe = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", [f"data.root={root}"])
    tasks.get("retinopathy").prepare(recipe)
    return root
