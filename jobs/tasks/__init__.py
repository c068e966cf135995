"""The task seam: what the one training engine, the driver, Tune, the registry, the bench and
serving know about each system, and the one registry of tasks.

A task is a `TaskSpec`, registered by name:

  - deepfleet's own three are listed once, in `jobs.tasks.builtin`;
  - a package outside deepfleet adds one through the `deepfleet.tasks` entry point group, naming
    its spec (``sentiment = "my_package:SPEC"`` under ``[project.entry-points."deepfleet.tasks"]``).

A spec is cheap to load: the recipe's typed sections and where the rest lives. The task's
functions (`TaskFunctions`: data, inputs, loss, metrics, baseline, drift features, plots) import
torch and the loaders, so they are imported on first use (`spec.fn`), as is its serving API
(`Serving`: request and response bodies, the codec between them and the model's rows).
Every list of tasks (recipes, CLI, bench, serving) comes from `names()`.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from jobs.config import RecipeBase

ENTRY_POINTS = "deepfleet.tasks"
BUILTIN = "jobs.tasks.builtin:SPECS"


class TaskFunctions(Protocol):
    """What a task's functions module provides (`TaskSpec.functions` names it). `recipe` is the
    task's own recipe type; batches are dicts of numpy arrays, as Ray Data hands them over."""

    # constants, read-only (a module's tuple of four names is a tuple[str, ...])
    @property
    def METRICS(self) -> tuple[str, ...]:
        """Headline validation metrics (summary.json, model card); the first is the default goal."""

    @property
    def LOWER_IS_BETTER(self) -> tuple[str, ...]:
        """Those of METRICS where lower is better (val_loss always is)."""

    @property
    def CPU_BF16(self) -> bool:
        """Whether dtype auto picks bf16 on CPUs with native bf16 (else fp32 there)."""

    @property
    def REFERENCE_ROWS(self) -> int | None:
        """Validation rows of the drift reference (None: jobs.export.REFERENCE_ROWS)."""

    @property
    def SHUFFLE_BUFFER_ROWS(self) -> int | None:
        """Rows each training rank shuffles locally, reseeded every epoch (None: the split's order)."""

    def prepare(self, recipe: Any) -> dict:
        """Generate or import the data into Parquet shards; returns the manifest."""

    def datasets(self, recipe: Any, manifest: dict) -> dict:
        """Ray Datasets "train" and "val", decoded and augmented."""

    def model_kwargs(self, recipe: Any) -> dict:
        """Registry keyword arguments of the recipe's model (its model section plus what the data fixes)."""

    def input_spec(self, recipe: Any) -> dict:
        """What the model's input looks like (kept in the model card; iter_split and serving read it)."""

    def example_batch(self, recipe: Any, rows: int) -> dict[str, np.ndarray]:
        """Zeros shaped like a decoded training batch of `rows` rows (deepfleet plan measures
        activations with it before any data exists)."""

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The model's positional inputs from a numpy batch."""

    def targets(self, batch: dict, device: torch.device) -> Any:
        """What the metrics compare the output with."""

    def loss(self, recipe: Any, output: Any, batch: dict, device: torch.device) -> torch.Tensor:
        """The training loss (fp32)."""

    def metrics(self, recipe: Any) -> Any:
        """A torchmetrics Metric whose compute() gives METRICS (and val_loss, val_rows); it syncs
        across ranks by itself."""

    def baseline(self, recipe: Any, manifest: dict, siblings: dict | None = None) -> dict:
        """The same metrics for trivial predictors (and the sibling runs' summaries)."""

    def siblings(self, recipe: Any) -> dict:
        """Runs the driver trains beside the recipe's own, by name (recsys: the MF baseline)."""

    def sample_ids(self, batch: dict) -> list[str]:
        """Stable ids of the rows (tracing; rows with one id are scored on one rank)."""

    @property
    def iter_split(self) -> Callable[..., Iterable[dict]]:
        """`iter_split(root, split, batch_size, **input_spec)`: numpy batches of a split without
        Ray (offline evaluation); each task takes the input_spec keys it needs."""

    def drift_features(self, inputs: tuple[torch.Tensor, ...], output: Any) -> dict[str, np.ndarray]:
        """Per-row float64 features of the model's inputs and output: export keeps their
        validation reference in the card, serving watches them for drift. Every batch pays it."""

    def export_files(self, recipe: Any) -> list[Path]:
        """Files an exported model carries next to its weights (recsys: the track catalogue)."""

    def plot(self, metric: Any, example: Any, out_dir: Path) -> list[str]:
        """Evaluation plots from the metric's state and one (batch, output) example; their paths."""


@dataclass(frozen=True)
class Serving:
    """A task's HTTP API: pydantic request and response bodies, and the codec (a
    `serve.codecs.Codec`) that turns a request into the model's rows and its output into an answer."""

    request: type
    response: type
    codec: type


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its recipe's typed sections, and where its functions and serving API
    live ("package.module" and "package.module:NAME", imported on first use)."""

    name: str
    recipe: type[RecipeBase]
    functions: str
    serving: str

    @cached_property
    def fn(self) -> TaskFunctions:
        module: Any = importlib.import_module(self.functions)
        return module

    @cached_property
    def api(self) -> Serving:
        return _resolve(self.serving)


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def _registry() -> dict[str, TaskSpec]:
    found: dict[str, TaskSpec] = {s.name: s for s in _resolve(BUILTIN)}
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            spec = ep.load()
        except Exception as e:  # one broken plugin must not stop the others, nor deepfleet
            warnings.warn(f"task plugin '{ep.name}' ({ep.value}) does not load: {e}", stacklevel=2)
            continue
        if not isinstance(spec, TaskSpec) or spec.name != ep.name or spec.name in found:
            warnings.warn(
                f"task plugin '{ep.name}' ({ep.value}) is not a new TaskSpec named '{ep.name}'", stacklevel=2
            )
            continue
        found[spec.name] = spec
    return found


def names() -> tuple[str, ...]:
    """Every registered task: deepfleet's own first, then the plugins'."""
    return tuple(_registry())


def builtin_names() -> tuple[str, ...]:
    """deepfleet's own tasks (what its docs and benchmarks cover)."""
    return tuple(s.name for s in _resolve(BUILTIN))


def spec(name: str) -> TaskSpec:
    tasks = _registry()
    if name not in tasks:
        raise ValueError(f"unknown task '{name}' (valid: {', '.join(tasks)})")
    return tasks[name]


def get(name: str) -> TaskFunctions:
    """The task's functions (imports torch and the task's loaders on first use)."""
    return spec(name).fn


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
    lower = ("val_loss", *get(task).LOWER_IS_BETTER)
    return "min" if metric in lower else "max"


def reported(task: str) -> tuple[str, ...]:
    """Validation metrics a run of the task reports (what Tune can rank and gates can check)."""
    return (*get(task).METRICS, "val_loss")


def save_figure(fig, out_dir, name: str, dpi: int = 100) -> list[str]:
    """Lay out, write and close a matplotlib figure; the paths a task's plot() returns."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [str(path)]
