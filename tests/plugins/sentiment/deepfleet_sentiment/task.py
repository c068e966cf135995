"""The sentiment task's functions (deepfleet's TaskFunctions): data, inputs, loss, metrics,
baseline, drift features and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryConfusionMatrix, BinaryF1Score

from deepfleet_sentiment import SentimentRecipe, data
from deepfleet_sentiment import model as _model  # noqa: F401  (registers the architecture)
from jobs.tasks import save_figure

METRICS = ("accuracy", "f1", "auc")
LOWER_IS_BETTER: tuple[str, ...] = ()
CPU_BF16 = False
REFERENCE_ROWS = None
SHUFFLE_BUFFER_ROWS = None


def prepare(recipe: SentimentRecipe) -> dict:
    return data.prepare(recipe.data.settings())


def datasets(recipe: SentimentRecipe, manifest: dict) -> dict:
    d = recipe.data
    return {
        "train": data.read_split(d.root, "train", d.max_len, manifest),
        "val": data.read_split(d.root, "val", d.max_len, manifest).materialize(),
    }


def model_kwargs(recipe: SentimentRecipe) -> dict:
    m = recipe.model
    return {
        "vocab_size": data.VOCAB_SIZE,
        "max_len": recipe.data.max_len,
        **m.model_dump(exclude={"name", "flavour"}),
    }


def input_spec(recipe: SentimentRecipe) -> dict:
    return {"max_len": recipe.data.max_len}


def example_batch(recipe: SentimentRecipe, rows: int) -> dict[str, np.ndarray]:
    """Zeros shaped like a decoded training batch: token ids and mask [B, max_len]."""
    shape = (rows, recipe.data.max_len)
    return {"input_ids": np.zeros(shape, np.int64), "attention_mask": np.ones(shape, np.int64)}


def inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(batch[k], device=device) for k in ("input_ids", "attention_mask"))


def targets(batch: dict, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(batch["label"], device=device, dtype=torch.long)


def loss(recipe: SentimentRecipe, output: torch.Tensor, batch: dict, device: torch.device) -> torch.Tensor:
    return F.cross_entropy(output.float(), targets(batch, device))


class SentimentMetrics(torchmetrics.Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        # binned AUROC: a fixed-size state that syncs across ranks even where a rank scored no row
        # (a small validation split can sit in one block, all of it on one rank)
        self.accuracy, self.f1, self.auc = BinaryAccuracy(), BinaryF1Score(), BinaryAUROC(thresholds=200)
        self.confusion = BinaryConfusionMatrix()
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        positive = logits.softmax(-1)[:, 1]
        for m in (self.accuracy, self.f1, self.auc, self.confusion):
            m.update(positive, target)
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> dict:
        return {
            "accuracy": float(self.accuracy.compute()),
            "f1": float(self.f1.compute()),
            "auc": float(self.auc.compute()),
            "val_loss": float(self.loss_sum / self.count.clamp(min=1)),
            "val_rows": int(self.count),
        }


def metrics(recipe: SentimentRecipe | None = None) -> SentimentMetrics:
    return SentimentMetrics()


def baseline(recipe: SentimentRecipe, manifest: dict, siblings: dict | None = None) -> dict:
    """The training split's more common label for every review."""
    counts = manifest["meta"]["class_counts"]
    guess = int(np.argmax(counts["train"]))
    val = np.asarray(counts["val"], dtype=float)
    return {
        "predictor": f"always {data.LABELS[guess]}",
        "accuracy": float(val[guess] / max(val.sum(), 1)),
        "f1": 2 * val[1] / (2 * val[1] + val[0]) if guess == 1 else 0.0,
        "auc": 0.5,
    }


def siblings(recipe: SentimentRecipe) -> dict:
    return {}


def sample_ids(batch: dict) -> list[str]:
    return [str(i) for i in batch["text_id"]]


iter_split = data.iter_split


def drift_features(inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> dict[str, np.ndarray]:
    """Per review: its length in tokens, its share of unknown words and the positive probability."""
    ids, mask = inputs
    length = mask.sum(1).double()
    unknown = (ids == data.UNK).sum(1).double() / length.clamp(min=1)
    positive = output.detach().double().softmax(-1)[:, 1]
    return {
        k: v.cpu().numpy() for k, v in {"tokens": length, "unknown": unknown, "positive": positive}.items()
    }


def export_files(recipe: SentimentRecipe) -> list[Path]:
    return []


def plot(metric: SentimentMetrics, example, out_dir: Path) -> list[str]:
    """The confusion matrix of the split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = metric.confusion.compute().numpy()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=data.LABELS, yticklabels=data.LABELS)
    ax.set(xlabel="predicted", ylabel="true", title=f"Sentiment: {int(counts.sum())} reviews")
    return save_figure(fig, out_dir, "confusion_matrix.png")
