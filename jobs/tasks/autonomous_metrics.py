"""The autonomous task's validation metric (jobs.tasks.autonomous.metrics imports it when a
process scores rows: torchmetrics takes seconds to import)."""

from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist
import torchmetrics
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from jobs.config import AutonomousLoss
from jobs.tasks.autonomous import _images, task_loss


class PerceptionMetrics(torchmetrics.Metric):
    """Box mAP@0.5 (every camera image one detection image), lane point error in image widths,
    depth AbsRel and delta < 1.25 over pixels with depth; syncs across ranks by itself."""

    full_state_update = False

    def __init__(self, aspect: float, loss_weights: AutonomousLoss):
        super().__init__()
        self.aspect = aspect  # height / width: lane errors are measured in image widths
        self.weights = loss_weights
        self._detections: list[tuple[dict, dict]] = []  # (prediction, truth) per camera image, on CPU
        for name, dtype in (
            ("lane_error_sum", torch.float64),
            ("lane_count", torch.long),
            ("absrel_sum", torch.float64),
            ("delta1_count", torch.long),
            ("pixels", torch.long),
            ("loss_sum", torch.float64),
            ("rows", torch.long),
        ):
            self.add_state(name, torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, output: dict, target: dict) -> None:
        rows = output["boxes"].shape[0]
        self.loss_sum += (
            task_loss(self.weights, {k: v for k, v in output.items() if k != "aux"}, target).double() * rows
        )
        self.rows += rows
        # detection: score = most likely real class, one detection per query
        prob = output["logits"].float().softmax(-1)[..., :-1].flatten(0, 1)
        scores, labels = prob.max(-1)
        boxes = box_convert(output["boxes"].float().flatten(0, 1), "cxcywh", "xyxy")
        t = _images(target)
        for i in range(boxes.shape[0]):
            keep = t["box_labels"][i] >= 0
            self._detections.append(
                (
                    {"boxes": boxes[i].cpu(), "scores": scores[i].cpu(), "labels": labels[i].cpu()},
                    {"boxes": t["boxes"][i][keep].float().cpu(), "labels": t["box_labels"][i][keep].cpu()},
                )
            )
        # lanes that exist: mean point distance, in image widths
        diff = (output["lanes"].float() - target["lanes"].float()) * torch.tensor(
            [1.0, self.aspect], device=self.device
        )
        exists = target["lane_exists"] > 0.5
        self.lane_error_sum += diff.norm(dim=-1).mean(-1)[exists].double().sum()
        self.lane_count += int(exists.sum())
        # depth over valid pixels
        valid = target["depth"] > 0
        pred, true = output["depth"].float()[valid].clamp(min=1e-3), target["depth"].float()[valid]
        self.absrel_sum += ((pred - true).abs() / true).double().sum()
        self.delta1_count += int((torch.maximum(pred / true, true / pred) < 1.25).sum())
        self.pixels += int(valid.sum())

    def reset(self) -> None:
        super().reset()
        self._detections = []

    def _map50(self) -> float:
        """COCO-style mAP@0.5 over every rank's detections (gathered as objects: torchmetrics'
        own sync of the detection lists breaks over gloo when ranks hold different counts)."""
        detections = self._detections
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, detections)
            detections = [d for part in parts for d in part]
        if not detections:
            return 0.0
        # the detections are every rank's already: its own sync would gather them all again, one
        # tensor per collective: thousands of all-gathers, most of a validation pass
        metric = MeanAveragePrecision(
            box_format="xyxy", iou_thresholds=[0.5], backend="pycocotools", sync_on_compute=False
        )
        metric.update([p for p, _ in detections], [t for _, t in detections])
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its whole table
            return float(metric.compute()["map_50"])

    def compute(self) -> dict[str, float]:
        return {
            "box_map50": self._map50(),
            "lane_error": float(self.lane_error_sum / self.lane_count.clamp(min=1)),
            "depth_absrel": float(self.absrel_sum / self.pixels.clamp(min=1)),
            "depth_delta1": float(self.delta1_count / self.pixels.clamp(min=1)),
            "val_loss": float(self.loss_sum / self.rows.clamp(min=1)),
            "val_rows": int(self.rows),
        }
