"""Task adapters: what the one training engine needs to know about each system.

A task module provides:
  prepare(recipe) -> manifest            generate or import the data into Parquet shards
  datasets(recipe, manifest) -> dict     Ray Datasets "train" and "val", decoded and augmented
  build_model(recipe) -> nn.Module       from the model registry
  inputs(batch, device, dtype)           the model's positional inputs from a numpy batch
  loss(recipe, output, batch, device)    the training loss
  metrics(recipe) -> Metric              a torchmetrics Metric whose compute() gives the named metrics
  baseline(manifest) -> dict             the same metrics for a trivial predictor
  sample_ids(batch) -> list[str]         stable ids of the rows (tracing, rank-sharded validation)
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("retinopathy",)


def get(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (valid: {', '.join(TASKS)})")
    return importlib.import_module(f"jobs.tasks.{name}")
