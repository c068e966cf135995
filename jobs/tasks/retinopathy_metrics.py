"""The retinopathy task's validation metric (jobs.tasks.retinopathy.metrics imports it when a
process scores rows: torchmetrics takes seconds to import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import (
    BinaryRecall,
    BinarySpecificity,
    CohenKappa,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
)

import models
from jobs.tasks.retinopathy import REFERABLE


class GradeMetrics(torchmetrics.Metric):
    """Kappa, accuracy and referable-DR sensitivity/specificity; syncs across ranks by itself."""

    full_state_update = False

    def __init__(self, num_classes: int = models.retinopathy.NUM_GRADES):
        super().__init__()
        self.kappa = CohenKappa(task="multiclass", num_classes=num_classes, weights="quadratic")
        self.accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.sensitivity = BinaryRecall()
        self.specificity = BinarySpecificity()
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes)  # for the plot
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        pred = logits.argmax(dim=1)
        self.kappa.update(pred, target)
        self.accuracy.update(pred, target)
        self.confusion.update(pred, target)
        self.sensitivity.update((pred >= REFERABLE).long(), (target >= REFERABLE).long())
        self.specificity.update((pred >= REFERABLE).long(), (target >= REFERABLE).long())
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        return {
            "kappa": float(self.kappa.compute()),
            "accuracy": float(self.accuracy.compute()),
            "referable_sensitivity": float(self.sensitivity.compute()),
            "referable_specificity": float(self.specificity.compute()),
            "val_loss": float(self.loss_sum / self.count.clamp(min=1)),
            "val_rows": int(self.count),
        }
