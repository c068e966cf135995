"""What an autonomous record is: one 8-camera rig sample (:data:`SCHEMA`), and how it stores depth."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

TASK = "autonomous"
NUM_CAMERAS = 8
CLASSES = ("car", "truck", "pedestrian")
SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "rig")
BAD_SAMPLE_POLICIES = ("skip", "fail")
STATS_FILE = "stats.npz"

BOX_TYPE = pa.struct(
    [
        ("camera", pa.int8()),
        ("label", pa.int8()),  # index into CLASSES
        ("x1", pa.float32()),  # pixels, continuous coordinates (x2, y2 exclusive edges)
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("images", pa.list_(pa.binary())),  # 8 PNG, RGB uint8, camera order
        ("depths", pa.list_(pa.binary())),  # 8 PNG, 16-bit grayscale, millimetres, 0 = invalid
        ("boxes", pa.list_(BOX_TYPE)),
        ("lanes", pa.list_(pa.float32())),  # [8, num_lanes, lane_points, 2] (u, v) pixels, flattened
        ("lane_exists", pa.list_(pa.bool_())),  # [8, num_lanes], flattened
        ("height", pa.int16()),
        ("width", pa.int16()),
    ]
)

# Per-channel mean and std of generated rig images (all 8 cameras, sky included; measured on 200
# rigs at 64 x 96), so inputs are about zero-mean, unit-variance. Fixed constants, not
# per-dataset statistics: serving must normalise a lone rig exactly as training did.
MEAN = np.array([0.45, 0.51, 0.55], dtype=np.float32)
STD = np.array([0.15, 0.18, 0.26], dtype=np.float32)

# Stored columns the readers decode.
READ_COLUMNS = ["sample_id", "images", "depths", "boxes", "lanes", "lane_exists"]


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """16-bit grayscale PNG of an H x W depth map in metres (stored in millimetres, 0 = invalid)."""
    mm = np.clip(np.rint(np.nan_to_num(depth_m, nan=0.0) * 1000.0), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_depth_png(data: bytes) -> np.ndarray:
    """Depth in metres (float32 H x W) from a 16-bit (or 8-bit) grayscale PNG in millimetres."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
        raise ValueError(f"depth map must be a single-channel 16-bit PNG, got mode {img.mode}")
    return np.asarray(img).astype(np.float32) / 1000.0


def box_field(box: Any, name: str, i: int) -> Any:
    """Field ``name`` of a box given as a stored dict or as a tuple in :data:`BOX_TYPE` order (index ``i``)."""
    return box[name] if isinstance(box, dict) else box[i]
