"""Looking at a rig: a contact sheet of the 8 cameras with boxes, lanes and depth."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from .schema import CLASSES, MEAN, NUM_CAMERAS, STD, box_field, decode_depth_png

_CLASS_COLOURS = ("#00e5ff", "#ff6d00", "#ff00ff")
_LANE_COLOURS = ("#ffee58", "#76ff03", "#40c4ff", "#ff4081", "#ffffff", "#b388ff")


def _as_view(sample: dict) -> dict[str, Any]:
    """A stored record or a decoded row/batch -> uint8 images, depth, pixel boxes and lanes."""
    if "depths" in sample:  # a SCHEMA record
        images = np.stack(
            [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in sample["images"]]
        )
        depth = np.stack([decode_depth_png(bytes(b)) for b in sample["depths"]])
        h, w = images.shape[1:3]
        exists = np.asarray(sample["lane_exists"], dtype=bool).reshape(NUM_CAMERAS, -1)
        lanes = np.asarray(sample["lanes"], dtype=np.float32).reshape(NUM_CAMERAS, exists.shape[1], -1, 2)
        boxes = [
            (int(box_field(b, "camera", 0)), int(box_field(b, "label", 1)),
             *(float(box_field(b, k, 2 + i)) for i, k in enumerate(("x1", "y1", "x2", "y2"))))
            for b in sample["boxes"]
        ]  # fmt: skip
        return {"id": str(sample["sample_id"]), "images": images, "depth": depth, "boxes": boxes,
                "lanes": lanes, "exists": exists}  # fmt: skip
    x = np.asarray(sample["images"])
    pick = x.ndim == 5  # a whole decoded batch: show its first row
    row = {k: (np.asarray(v)[0] if pick else v) for k, v in sample.items()}
    x = np.asarray(row["images"]).transpose(0, 2, 3, 1) * STD + MEAN
    images = np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
    h, w = images.shape[1:3]
    scale = np.array([w, h, w, h])
    boxes = [
        (cam, int(lab), *(np.asarray(row["boxes"])[cam, j] * scale).tolist())
        for cam, j in zip(*np.nonzero(np.asarray(row["box_labels"]) >= 0), strict=True)
        for lab in [np.asarray(row["box_labels"])[cam, j]]
    ]
    return {
        "id": str(row.get("sample_id", "")),
        "images": images,
        "depth": np.asarray(row["depth"]),
        "boxes": boxes,
        "lanes": np.asarray(row["lanes"]) * (w, h),
        "exists": np.asarray(row["lane_exists"]) > 0.5,
    }


def plot_sample(sample: dict, path: str) -> str:
    """Save a contact sheet of one rig to ``path`` (PNG): per camera the image with boxes and lanes
    drawn, and its depth map. ``sample`` is a stored record or a decoded row (or batch: row 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = _as_view(sample)
    h, w = v["images"].shape[1:3]
    fig, axes = plt.subplots(4, 4, figsize=(16, 16 * h / w * 0.95 + 0.6))
    vmax = max(float(v["depth"].max()), 1.0)
    for k in range(NUM_CAMERAS):
        ax = axes[2 * (k // 4), k % 4]
        ax.imshow(v["images"][k], extent=(0, w, h, 0))
        for cam, label, x1, y1, x2, y2 in v["boxes"]:
            if cam == k:
                colour = _CLASS_COLOURS[label % len(_CLASS_COLOURS)]
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=colour))
                ax.text(x1, y1, CLASSES[label] if label < len(CLASSES) else str(label), color=colour, fontsize=7,
                        va="bottom")  # fmt: skip
        for slot in np.flatnonzero(v["exists"][k]):
            pts = v["lanes"][k, slot]
            ax.plot(pts[:, 0], pts[:, 1], ".-", lw=1, ms=3, color=_LANE_COLOURS[slot % len(_LANE_COLOURS)])
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"cam {k} (yaw {45 * k} deg)", fontsize=9)
        ax.axis("off")
        dax = axes[2 * (k // 4) + 1, k % 4]
        shown = np.ma.masked_where(v["depth"][k] <= 0, v["depth"][k])
        dax.imshow(shown, cmap="magma_r", vmin=0, vmax=vmax, extent=(0, w, h, 0))
        dax.set_title(f"depth {k} (0-{vmax:.0f} m, blank = none)", fontsize=8)
        dax.axis("off")
    legend = ", ".join(f"{c} {col}" for c, col in zip(CLASSES, ("cyan", "orange", "magenta"), strict=True))
    fig.suptitle(f"rig {v['id']}: boxes {legend}; lanes by slot", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
