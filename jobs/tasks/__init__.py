"""Task adapters: what the one training engine needs to know about each system.

A task module provides:
  METRICS                                names of the headline validation metrics (summary.json)
  LOWER_IS_BETTER                        those of them where lower is better (optional; val_loss always)
  REFERENCE_ROWS                         validation rows of the drift reference (optional; default
                                         jobs.export.REFERENCE_ROWS)
  CPU_BF16                               whether dtype auto picks bf16 on CPUs with native bf16
                                         (optional; default False: fp32 on CPUs)
  SHUFFLE_BUFFER_ROWS                    rows each training rank shuffles locally, reseeded every
                                         epoch (optional; default: the split's order)
  prepare(recipe) -> manifest            generate or import the data into Parquet shards
  datasets(recipe, manifest) -> dict     Ray Datasets "train" and "val", decoded and augmented
  model_kwargs(recipe) -> dict           registry keyword arguments of the recipe's model (the
                                         recipe's model section plus what the data fixes)
  input_spec(recipe) -> dict             what the model's input looks like (kept in the model card;
                                         iter_split and serving read it)
  inputs(batch, device, dtype)           the model's positional inputs from a numpy batch
  targets(batch, device)                 what metrics compare the output with
  loss(recipe, output, batch, device)    the training loss
  metrics(recipe) -> Metric              a torchmetrics Metric whose compute() gives the named metrics
                                         (and val_loss, val_rows); it syncs across ranks by itself
  baseline(recipe, manifest, siblings)   the same metrics for trivial predictors (and sibling runs)
  siblings(recipe) -> dict               runs the driver trains beside the recipe's own, by name (optional;
                                         recsys: the MF baseline); their summaries reach baseline()
  sample_ids(batch) -> list[str]         stable ids of the rows (tracing, rank-sharded validation:
                                         rows with one id are scored on one rank)
  iter_split(root, split, batch_size, **input_spec)  numpy batches without Ray (offline evaluation)
  drift_features(inputs, output) -> dict per-row float64 numpy features of the model's inputs (as
                                         inputs() makes them) and of its output: export keeps their
                                         validation-split reference in the card, serving watches
                                         them for drift (jobs.drift); cheap, every batch pays it
  export_files(recipe) -> list[Path]     files an exported model carries next to its weights
                                         (optional; recsys: the track catalogue)
  plot(metric, example, out_dir)         evaluation plots from the metric's state and one
                                         (batch, output) example; returns the paths
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("retinopathy", "autonomous", "recsys")


def build_model(recipe):
    """The recipe's model from the registry (architecture only, random or `pretrained` weights)."""
    import models

    return models.build(recipe.model.name, recipe.model.flavour, **get(recipe.task).model_kwargs(recipe))


def normalised(images, device, dtype, mean, std):
    """uint8 images [..., 3, H, W] (numpy) -> (x / 255 - mean) / std in `dtype` on the device.
    The pixels cross to the device as uint8 (a quarter of float32's bytes), from pinned memory
    and without waiting for the copy when the device is a GPU; the arithmetic runs there."""
    import torch

    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    shape = (3, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(shape)
    return ((x.to(device=device, dtype=torch.float32) / 255.0 - m) / s).to(dtype)


def goal(task: str, metric: str) -> str:
    """Return "min" when a lower value of the metric is better, else "max"."""
    lower = ("val_loss", *getattr(get(task), "LOWER_IS_BETTER", ()))
    return "min" if metric in lower else "max"


def reported(task: str) -> tuple[str, ...]:
    """Validation metrics a run of the task reports (what Tune can rank and gates can check)."""
    return (*get(task).METRICS, "val_loss")


def save_figure(fig, out_dir, name: str, dpi: int = 100) -> list[str]:
    """Lay out, write and close a matplotlib figure; the paths a task's plot() returns."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [str(path)]


def get(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (valid: {', '.join(TASKS)})")
    return importlib.import_module(f"jobs.tasks.{name}")
