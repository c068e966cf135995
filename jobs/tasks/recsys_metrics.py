"""The recsys task's validation metric (jobs.tasks.recsys.metrics imports it when a process
scores rows: torchmetrics takes seconds to import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import BinaryAUROC
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalPrecision
from torchmetrics.utilities import dim_zero_cat

from jobs.tasks.recsys import TOP_K

ROWS = {"prob": torch.float32, "relevant": torch.long, "cold": torch.bool, "index": torch.long}


class RankingMetrics(torchmetrics.Metric):
    """AUC over all rows, NDCG@10 and precision@10 per candidate list, AUC over rows whose
    candidate is a cold-start track; syncs across ranks by itself.

    The rows are kept in "cat" states and the torchmetrics metrics run on all of them at compute
    time. (Their own retrieval states are lists synced one update at a time, and a rank that
    scored no row of some batch makes one update fewer than its peers: the collectives would
    no longer pair up.)

    A list whose real event was skipped has no relevant row: the ranking metrics leave it out
    (empty_target_action="skip"); AUC still counts its rows as negatives. With one relevant row
    per list, precision@10 is at most 0.1.
    """

    full_state_update = False

    def __init__(self, with_loss: bool = True):
        super().__init__()
        self.with_loss = with_loss
        for name in ROWS:  # one value per row
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._no_rows_yet()

    def reset(self) -> None:
        super().reset()
        self._no_rows_yet()

    def _no_rows_yet(self) -> None:
        """Each row state starts with an empty tensor: a rank that scores no row (validation
        rows are split across ranks, and a small split may leave one rank none) still joins
        every gather of the sync; an empty list would skip them and the collectives would no
        longer pair up."""
        for name, dtype in ROWS.items():
            getattr(self, name).append(torch.empty(0, dtype=dtype, device=self.device))

    def update(self, scores: torch.Tensor, target: dict[str, torch.Tensor]) -> None:
        """scores: logits [B] (a ranking score for baselines); target: label, is_cold, index [B]."""
        logits = scores.float()
        label = target["label"].float()
        # Probabilities, not logits: BinaryAUROC applies a sigmoid only to batches holding a value
        # outside [0, 1], and torchmetrics' precision@k counts only rows scored above 0.
        self.prob.append(torch.sigmoid(logits))
        self.relevant.append(label.long())
        self.cold.append(target["is_cold"].bool())
        self.index.append(target["index"].long())
        if self.with_loss:
            self.loss_sum += F.binary_cross_entropy_with_logits(logits, label, reduction="sum").double()
        self.count += label.numel()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probability, relevant, cold, query index) of every row scored so far (on this rank)."""
        return tuple(dim_zero_cat(s) for s in (self.prob, self.relevant, self.cold, self.index))

    def compute(self) -> dict[str, float]:
        prob, relevant, cold, index = self.rows()  # every rank's rows: the states are synced here
        ranking = {"top_k": TOP_K, "empty_target_action": "skip", "sync_on_compute": False}

        def score(metric, *args, **kwargs) -> float:
            metric.update(*args, **kwargs)
            return float(metric.compute())

        out = {
            "auc": score(BinaryAUROC(sync_on_compute=False), prob, relevant),
            "ndcg10": score(RetrievalNormalizedDCG(**ranking), prob, relevant, indexes=index),
            "precision10": score(RetrievalPrecision(**ranking), prob, relevant, indexes=index),
            "cold_auc": (
                score(BinaryAUROC(sync_on_compute=False), prob[cold], relevant[cold])
                if cold.any()
                else float("nan")
            ),
        }
        if self.with_loss:
            out["val_loss"] = float(self.loss_sum / self.count.clamp(min=1))
        out["val_rows"] = int(self.count)
        return out
