"""Multi-camera perception: object sets (Hungarian-matched), lane points, dense depth."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from data_loaders import autonomous as data
from jobs.config import AutonomousLoss, AutonomousRecipe
from jobs.tasks import normalised, save_figure

if TYPE_CHECKING:
    from jobs.tasks.autonomous_metrics import PerceptionMetrics

METRICS = ("box_map50", "lane_error", "depth_absrel", "depth_delta1")
# dtype auto on CPU workers: fp32, bf16 does not make its step faster on a CPU (deepfleet bench
# --section train: bf16/fp32); its tiny recipe still learns in bf16 (tests/test_autonomous.py)
CPU_BF16 = False
LOWER_IS_BETTER = ("lane_error", "depth_absrel")
# Rigs of the drift reference export computes on the CPU (8 camera images each; a full model's
# 2048 rigs would take many minutes there); see jobs.export.reference_for.
REFERENCE_ROWS = 128
SHUFFLE_BUFFER_ROWS = None  # the split's order


def prepare(recipe: AutonomousRecipe) -> dict:
    return data.prepare(recipe.data.settings())


def _layout(recipe: AutonomousRecipe) -> dict:
    d = recipe.data
    return {"max_boxes": d.max_boxes, "num_lanes": d.num_lanes, "lane_points": d.lane_points}


def datasets(recipe: AutonomousRecipe, manifest: dict) -> dict:
    d, size = recipe.data, (recipe.data.image_height, recipe.data.image_width)
    read = dict(manifest=manifest, **_layout(recipe))
    return {
        "train": data.read_split(d.root, "train", size, augment=d.augment, **read),
        "val": data.read_split(d.root, "val", size, augment=False, **read).materialize(),
    }


def model_kwargs(recipe: AutonomousRecipe) -> dict:
    d = recipe.data
    return {"num_lanes": d.num_lanes, "lane_points": d.lane_points, **recipe.model.build_kwargs()}


def input_spec(recipe: AutonomousRecipe) -> dict:
    d = recipe.data
    return {"image_size": [d.image_height, d.image_width], "num_cameras": data.NUM_CAMERAS, **_layout(recipe)}


def example_batch(recipe: AutonomousRecipe, rows: int) -> dict[str, np.ndarray]:
    """Zeros shaped like a decoded training batch (deepfleet plan): images [B, 8, 3, H, W]."""
    spec = input_spec(recipe)
    h, w = spec["image_size"]
    return {"images": np.zeros((rows, spec["num_cameras"], 3, h, w), np.float32)}


def inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (normalised(batch["images"], device, dtype, data.MEAN, data.STD),)


def targets(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("boxes", "box_labels", "lanes", "lane_exists", "depth")
    return {k: torch.as_tensor(batch[k], device=device) for k in keys}


def sample_ids(batch: dict) -> list[str]:
    return [str(i) for i in batch["sample_id"]]


# ------------------------------------------------------------------ loss


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, target: dict, w: AutonomousLoss) -> list:
    """Hungarian matching per camera image (DETR): cost = -w_cls p(class) + w_l1 L1 - w_giou GIoU.

    logits [N, Q, C + 1], boxes [N, Q, 4] cxcywh; target boxes [N, M, 4] xyxy, labels [N, M] (-1 pad).
    Returns per image (query indices, target indices)."""
    prob = logits.float().softmax(-1)
    pred_xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    out = []
    for i in range(logits.shape[0]):
        keep = target["box_labels"][i] >= 0
        labels, gt = target["box_labels"][i][keep], target["boxes"][i][keep].float()
        if not len(labels):
            out.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            continue
        cost = (
            -w.box_class * prob[i][:, labels]
            + w.box_l1 * torch.cdist(boxes[i].float(), box_convert(gt, "xyxy", "cxcywh"), p=1)
            - w.box_giou * generalized_box_iou(pred_xyxy[i], gt)
        )
        out.append(linear_sum_assignment(cost.cpu().numpy()))
    return out


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, target: dict, w: AutonomousLoss) -> torch.Tensor:
    """Class cross-entropy over every query ("no object" down-weighted) + L1 and GIoU of matched boxes."""
    n, q, c1 = logits.shape
    pairs = match(logits, boxes, target, w)
    classes = torch.full((n, q), c1 - 1, dtype=torch.long, device=logits.device)
    pred_idx, gt_boxes = [], []
    for i, (qi, ti) in enumerate(pairs):
        labels = target["box_labels"][i][target["box_labels"][i] >= 0]
        gt = target["boxes"][i][target["box_labels"][i] >= 0]
        qi, ti = torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(ti, dtype=torch.long)
        classes[i, qi] = labels[ti]
        pred_idx.append(i * q + qi)
        gt_boxes.append(gt[ti].float())
    weight = torch.ones(c1, device=logits.device)
    weight[-1] = w.no_object
    loss = w.box_class * F.cross_entropy(logits.reshape(n * q, c1).float(), classes.flatten(), weight=weight)
    matched = torch.cat(pred_idx).to(logits.device)
    if len(matched):
        pred = boxes.reshape(n * q, 4)[matched].float()
        gt = torch.cat(gt_boxes)
        l1 = F.l1_loss(pred, box_convert(gt, "xyxy", "cxcywh"), reduction="sum") / len(matched)
        giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), gt, reduction="mean")
        loss = loss + w.box_l1 * l1 + w.box_giou * giou
    return loss


def _images(t: dict) -> dict:
    """Cameras folded into the batch: every camera image is one detection image."""
    return {k: t[k].flatten(0, 1) for k in ("boxes", "box_labels")}


def lane_loss(output: dict, target: dict, w: AutonomousLoss) -> torch.Tensor:
    exists = target["lane_exists"].float()
    per_lane = (output["lanes"].float() - target["lanes"].float()).abs().mean(dim=(-1, -2))
    points = (per_lane * exists).sum() / exists.sum().clamp(min=1)
    return w.lane_points * points + w.lane_exists * F.binary_cross_entropy_with_logits(
        output["lane_logits"].float(), exists
    )


def depth_loss(output: dict, target: dict) -> torch.Tensor:
    valid = target["depth"] > 0
    pred = output["depth"].float()[valid].clamp(min=1e-3)
    return (pred.log() - target["depth"][valid].float().log()).abs().mean()


def loss(recipe: AutonomousRecipe, output: dict, batch: dict, device: torch.device) -> torch.Tensor:
    return task_loss(recipe.loss, output, targets(batch, device))


def task_loss(w: AutonomousLoss, output: dict, target: dict) -> torch.Tensor:
    detections = _images(target)
    total = set_loss(output["logits"].flatten(0, 1), output["boxes"].flatten(0, 1), detections, w)
    if w.aux:
        for logits, boxes in output.get("aux", []):
            total = total + set_loss(logits.flatten(0, 1), boxes.flatten(0, 1), detections, w)
    return total + lane_loss(output, target, w) + w.depth * depth_loss(output, target)


# ------------------------------------------------------------------ metrics


def metrics(recipe: AutonomousRecipe) -> PerceptionMetrics:
    # torchmetrics takes seconds to import: only processes that score rows pay for it (not
    # serving replicas, Tune's trial drivers or the CLI)
    from jobs.tasks.autonomous_metrics import PerceptionMetrics

    return PerceptionMetrics(recipe.data.image_height / recipe.data.image_width, recipe.loss)


def baseline(recipe: AutonomousRecipe, manifest: dict, siblings: dict | None = None) -> dict:
    """Trivial predictors on the validation split: no boxes, the training split's mean lane for
    every camera and slot, its mean depth map for every camera."""
    d = recipe.data
    stats = data.train_statistics(d.root)
    mean_lanes, mean_depth = torch.as_tensor(stats["mean_lanes"]), torch.as_tensor(stats["mean_depth"])
    aspect = d.image_height / d.image_width
    lane_sum = absrel = delta1 = 0.0
    lanes = pixels = 0
    for batch in iter_split(d.root, "val", 16, (d.image_height, d.image_width), **_layout(recipe)):
        t = targets(batch, torch.device("cpu"))
        diff = (mean_lanes[None] - t["lanes"].float()) * torch.tensor([1.0, aspect])
        exists = t["lane_exists"] > 0.5
        lane_sum += float(diff.norm(dim=-1).mean(-1)[exists].sum())
        lanes += int(exists.sum())
        valid = t["depth"] > 0
        pred = mean_depth[None].expand_as(t["depth"])[valid].clamp(min=1e-3)
        true = t["depth"][valid]
        absrel += float(((pred - true).abs() / true).sum())
        delta1 += float((torch.maximum(pred / true, true / pred) < 1.25).sum())
        pixels += int(valid.sum())
    return {
        "predictor": "no boxes; mean lane; mean depth map (training split)",
        "box_map50": 0.0,
        "lane_error": lane_sum / max(lanes, 1),
        "depth_absrel": absrel / max(pixels, 1),
        "depth_delta1": delta1 / max(pixels, 1),
    }


def siblings(recipe: AutonomousRecipe) -> dict:
    return {}  # no other run trains beside this task's


def export_files(recipe: AutonomousRecipe) -> list[Path]:
    return []  # the weights and the card are the whole export


def drift_features(inputs: tuple[torch.Tensor, ...], output: dict) -> dict[str, np.ndarray]:
    """Per rig (float64): brightness and contrast of its normalised camera images (night, rain,
    a new camera), its mean predicted depth, its detections (queries whose most likely real class
    scores >= 0.5, as in PerceptionMetrics and the plot) and the mean lane existence probability
    (a new road mix). Cheap: serving computes them on every batch."""
    x = inputs[0].detach().double()  # [B, cams, 3, H, W], normalised
    scores = output["logits"].detach().double().softmax(-1)[..., :-1].amax(-1)  # [B, cams, Q]
    out = {
        "image_mean": x.mean(dim=(1, 2, 3, 4)),
        "image_std": x.flatten(1).std(dim=1),
        "depth_mean": output["depth"].detach().double().mean(dim=(1, 2, 3)),
        "detections": (scores >= 0.5).flatten(1).sum(1).double(),
        "lane_prob": torch.sigmoid(output["lane_logits"].detach().double()).mean(dim=(1, 2)),
    }
    return {k: v.cpu().numpy() for k, v in out.items()}


def iter_split(
    root, split: str, batch_size: int, image_size, max_boxes: int, num_lanes: int, lane_points: int, **_
):
    """Decoded batches of a split without Ray (offline evaluation)."""
    return data.iter_split_numpy(
        root, split, batch_size, tuple(image_size), max_boxes, num_lanes, lane_points
    )


def plot(metric: PerceptionMetrics, example, out_dir: Path) -> list[str]:
    """The first rig of the example batch: per camera the image with true (green) and predicted
    (red, score >= 0.5) boxes and lanes, the true depth and the predicted depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, output = example
    images = batch["images"][0].transpose(0, 2, 3, 1) / 255.0
    h, w = images.shape[1:3]
    prob = output["logits"][0].float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = box_convert(output["boxes"][0].float(), "cxcywh", "xyxy").numpy() * [w, h, w, h]
    lanes = output["lanes"][0].float().numpy() * [w, h]
    lane_on = torch.sigmoid(output["lane_logits"][0]).numpy() > 0.5
    depth = output["depth"][0].float().numpy()
    cams = images.shape[0]
    fig, axes = plt.subplots(3, cams, figsize=(2.4 * cams, 6.2))
    vmax = (
        float(np.percentile(batch["depth"][0][batch["depth"][0] > 0], 99))
        if (batch["depth"][0] > 0).any()
        else 1
    )
    for c in range(cams):
        ax = axes[0, c]
        ax.imshow(np.clip(images[c], 0, 1))
        for box, label in zip(batch["boxes"][0, c], batch["box_labels"][0, c], strict=True):
            if label >= 0:
                x1, y1, x2, y2 = box * [w, h, w, h]
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        for box, score, label in zip(boxes[c], scores[c], labels[c], strict=True):
            if score >= 0.5:
                x1, y1, x2, y2 = box
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
                ax.text(x1, y1, data.CLASSES[int(label)][:3], color="red", fontsize=6)
        for lane, on, true, exists in zip(
            lanes[c], lane_on[c], batch["lanes"][0, c], batch["lane_exists"][0, c], strict=True
        ):
            if exists > 0.5:
                ax.plot(true[:, 0] * w, true[:, 1] * h, color="lime", lw=0.8)
            if on:
                ax.plot(lane[:, 0], lane[:, 1], color="red", lw=0.8, ls="--")
        ax.set_title(f"camera {c}", fontsize=8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        true_depth = batch["depth"][0, c]
        axes[1, c].imshow(true_depth, vmin=0, vmax=vmax, cmap="magma")
        # where the truth has no depth (sky, beyond range) the prediction is not scored: masked
        axes[2, c].imshow(np.where(true_depth > 0, depth[c], 0), vmin=0, vmax=vmax, cmap="magma")
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("true depth", fontsize=8)
    axes[2, 0].set_ylabel("predicted depth\n(scored pixels)", fontsize=8)
    result = metric.compute()
    fig.suptitle(
        f"rig {batch['sample_id'][0]}: green = truth, red = prediction   "
        f"mAP@0.5 {result['box_map50']:.2f}  lane error {result['lane_error']:.3f} W  "
        f"depth AbsRel {result['depth_absrel']:.3f}"
    )
    return save_figure(fig, out_dir, "rig_predictions.png")
