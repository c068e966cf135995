"""Diabetic-retinopathy grading: 5 ICDR grades, kappa-gated."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from data_loaders import retinopathy as data
from jobs.config import RetinopathyRecipe
from jobs.tasks import normalised, save_figure

if TYPE_CHECKING:
    from jobs.tasks.retinopathy_metrics import GradeMetrics

REFERABLE = 2  # grade >= 2 (moderate NPDR or worse) is referred to an ophthalmologist
METRICS = ("kappa", "accuracy", "referable_sensitivity", "referable_specificity")
# dtype auto on CPU workers: bf16, its convolutions run faster in bf16 on CPUs with native bf16
# (deepfleet bench --section train: bf16/fp32)
CPU_BF16 = True
LOWER_IS_BETTER: tuple[str, ...] = ()
REFERENCE_ROWS = None  # jobs.export.REFERENCE_ROWS
SHUFFLE_BUFFER_ROWS = None  # the split's order


def prepare(recipe: RetinopathyRecipe) -> dict:
    return data.prepare(recipe.data.settings())


def datasets(recipe: RetinopathyRecipe, manifest: dict) -> dict:
    d = recipe.data
    return {
        "train": data.read_split(d.root, "train", d.image_size, augment=d.augment, manifest=manifest),
        # decoded once and kept in the object store: each epoch's validation then skips
        # re-reading and re-decoding (seconds of Ray Data start-up per epoch on small machines)
        "val": data.read_split(d.root, "val", d.image_size, augment=False, manifest=manifest).materialize(),
    }


def model_kwargs(recipe: RetinopathyRecipe) -> dict:
    return recipe.model.build_kwargs()


def input_spec(recipe: RetinopathyRecipe) -> dict:
    return {"image_size": recipe.data.image_size}


def example_batch(recipe: RetinopathyRecipe, rows: int) -> dict[str, np.ndarray]:
    """Zeros shaped like a decoded training batch (deepfleet plan): image [B, 3, S, S]."""
    s = recipe.data.image_size
    return {"image": np.zeros((rows, 3, s, s), np.float32)}


def inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (normalised(batch["image"], device, dtype, data.MEAN, data.STD),)


def targets(batch: dict, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(batch["label"], device=device, dtype=torch.long)


def loss(recipe: RetinopathyRecipe, output, batch: dict, device: torch.device) -> torch.Tensor:
    y = targets(batch, device)
    if isinstance(output, tuple):  # InceptionV3 in training: (logits, aux_logits)
        logits, aux = output
        return F.cross_entropy(logits.float(), y) + recipe.train.aux_loss_weight * F.cross_entropy(
            aux.float(), y
        )
    return F.cross_entropy(output.float(), y)


def sample_ids(batch: dict) -> list[str]:
    return [str(i) for i in batch["image_id"]]


def metrics(recipe: RetinopathyRecipe | None = None) -> GradeMetrics:
    # torchmetrics takes seconds to import: only processes that score rows pay for it (not
    # serving replicas, Tune's trial drivers or the CLI)
    from jobs.tasks.retinopathy_metrics import GradeMetrics

    return GradeMetrics()


def baseline(recipe: RetinopathyRecipe, manifest: dict, siblings: dict | None = None) -> dict[str, float]:
    """A constant guess of the training split's most common grade (kappa 0 by definition)."""
    counts = manifest["meta"]["class_counts"]  # per split: a count per grade
    train, val = (np.asarray(counts[split], dtype=float) for split in ("train", "val"))
    guess = int(train.argmax())
    positives = val[REFERABLE:].sum()
    return {
        "predictor": f"constant grade {guess}",
        "kappa": 0.0,
        "accuracy": float(val[guess] / max(val.sum(), 1)),
        "referable_sensitivity": 1.0 if guess >= REFERABLE and positives else 0.0,
        "referable_specificity": 0.0 if guess >= REFERABLE else 1.0,
    }


def siblings(recipe: RetinopathyRecipe) -> dict:
    return {}  # no other run trains beside this task's


def export_files(recipe: RetinopathyRecipe) -> list[Path]:
    return []  # the weights and the card are the whole export


def drift_features(inputs: tuple[torch.Tensor, ...], output) -> dict[str, np.ndarray]:
    """Per image (float64): brightness and contrast of the normalised pixels, the colour balance
    (a different camera or lighting moves the channel means), the predicted probability of
    referable DR and the top grade's probability. Cheap: serving computes them on every batch."""
    x = inputs[0].detach().double()  # [B, 3, H, W], normalised
    logits = output[0] if isinstance(output, tuple) else output  # InceptionV3 in training mode
    prob = logits.detach().double().softmax(-1)
    channel = x.mean(dim=(2, 3))
    out = {
        "image_mean": x.mean(dim=(1, 2, 3)),
        "image_std": x.flatten(1).std(dim=1),
        "red_mean": channel[:, 0],
        "green_mean": channel[:, 1],
        "blue_mean": channel[:, 2],
        "referable_prob": prob[:, REFERABLE:].sum(-1),
        "confidence": prob.max(-1).values,
    }
    return {k: v.cpu().numpy() for k, v in out.items()}


def iter_split(root: str | Path, split: str, batch_size: int, image_size: int):
    """Decoded batches of a split without Ray (offline evaluation)."""
    return data.iter_split_numpy(root, split, batch_size, image_size)


def plot(metric: GradeMetrics, example, out_dir: Path) -> list[str]:
    """Confusion matrix of grades, counts and row-normalised side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    grades = ["0 none", "1 mild", "2 moderate", "3 severe", "4 prolif."]
    counts = metric.confusion.compute().numpy()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, matrix, title in ((axes[0], counts, "counts"), (axes[1], shares, "share of true grade")):
        ConfusionMatrixDisplay(matrix, display_labels=grades).plot(
            ax=ax, colorbar=False, values_format=".2f" if matrix is shares else "d"
        )
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"Retinopathy grades: {int(counts.sum())} images")
    return save_figure(fig, out_dir, "confusion_matrix.png")
