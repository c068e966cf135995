"""Synthetic rigs: random scenes (:mod:`.scene`) rendered (:mod:`.render`) into :data:`SCHEMA` records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..shards import encode_png
from .camera import image_hw
from .render import render_scene
from .scene import make_scene
from .schema import encode_depth_png


def _record(sample_id: str, out: dict[str, Any]) -> dict:
    _, h, w, _ = out["image"].shape
    return {
        "sample_id": sample_id,
        "images": [encode_png(im) for im in out["image"]],
        "depths": [encode_depth_png(dm) for dm in out["depth"]],
        "boxes": [
            {"camera": b[0], "label": b[1], "x1": b[2], "y1": b[3], "x2": b[4], "y2": b[5]}
            for b in out["boxes"]
        ],
        "lanes": out["lanes"].reshape(-1).tolist(),
        "lane_exists": out["lane_exists"].reshape(-1).tolist(),
        "height": h,
        "width": w,
    }


def generate(
    num_samples: int,
    image_size: Sequence[int],
    seed: int,
    max_boxes: int = 8,
    num_lanes: int = 4,
    lane_points: int = 12,
) -> Iterator[dict]:
    """Yield ``num_samples`` synthetic rig records in :data:`SCHEMA`.

    Deterministic for a seed, and sample ``i`` depends only on ``(seed, i)``: see
    :func:`make_scene` and :func:`render_scene` to get the scene and pixel-exact labels
    (instance ids, float depth) behind a record.
    """
    h, w = image_hw(image_size)
    for i in range(num_samples):
        scene = make_scene(np.random.default_rng([seed, i]), max_boxes, num_lanes)
        yield _record(f"synth_{i:06d}", render_scene(scene, (h, w), lane_points))
