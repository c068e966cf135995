"""Rig folders: the importer (``source: rig``) and the exporter that writes the same layout.

Rig folder layout (``source: rig``)::

    <rig>/<sample_id>/cam0.png .. cam7.png      RGB (any PNG/JPEG mode), all the same size
    <rig>/<sample_id>/depth0.png .. depth7.png  optional 16-bit grayscale PNG, depth in millimetres
                                                (0 = no depth; a missing file = no depth there)
    <rig>/<sample_id>/annotations.json
        {"cameras": [                          exactly 8 entries, camera k at index k
            {"boxes": [{"label": "car", "xyxy": [x1, y1, x2, y2]}, ...],   pixels, label in CLASSES
             "lanes": [{"slot": 0, "points": [[u, v], ...]}, ...]},        slot < num_lanes, >= 2 points
            ...]}

Lane slot ``k`` is the ``k``-th painted line from the left of the road. A lane with exactly
``lane_points`` points is kept as given; any other count (>= 2) is resampled to ``lane_points``
points evenly spaced by arc length in the image. :func:`export_rig` writes this layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError, one_line
from ..shards import IMAGE_ERRORS, check_choice, encode_png
from .camera import image_hw
from .schema import BAD_SAMPLE_POLICIES, CLASSES, NUM_CAMERAS, decode_depth_png, encode_depth_png

_CAM_RE = re.compile(r"^cam(\d+)\.png$")
_DEPTH_RE = re.compile(r"^depth(\d+)\.png$")
ANNOTATIONS = "annotations.json"


def _resample_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along a polyline [m, 2] (m >= 2)."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] <= 0:
        return np.repeat(points[:1], n, axis=0)
    at = np.linspace(0.0, cum[-1], n)
    return np.stack([np.interp(at, cum, points[:, 0]), np.interp(at, cum, points[:, 1])], -1)


def _read_rig_sample(
    sample_dir: str, sid: str, image_size: tuple[int, int], num_lanes: int, lane_points: int
) -> dict:
    """One rig folder -> a :data:`SCHEMA` record; DataError (naming the folder) for anything wrong."""

    def bad(problem: str) -> DataError:
        return DataError(f"bad rig sample {sid} ({sample_dir}): {problem}")

    images, depths = _read_pixels(sample_dir, image_size, bad)
    boxes, lanes, exists = _read_annotations(sample_dir, image_size, num_lanes, lane_points, bad)
    h, w = image_size
    return {
        "sample_id": sid,
        "images": [encode_png(im) for im in images],
        "depths": [encode_depth_png(dm) for dm in depths],
        "boxes": boxes,
        "lanes": lanes.reshape(-1).tolist(),
        "lane_exists": exists.reshape(-1).tolist(),
        "height": h,
        "width": w,
    }


def _read_pixels(
    sample_dir: str, image_size: tuple[int, int], bad: Callable[[str], DataError]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The 8 camera images (uint8 H x W x 3) and depth maps (metres; zeros where a file is missing)."""
    names = os.listdir(sample_dir)
    cams = sorted(int(m[1]) for m in map(_CAM_RE.match, names) if m)
    if cams != list(range(NUM_CAMERAS)):
        raise bad(f"expected {NUM_CAMERAS} camera images cam0.png..cam7.png, found {len(cams)}")
    depth_ids = {int(m[1]) for m in map(_DEPTH_RE.match, names) if m}
    if depth_ids - set(range(NUM_CAMERAS)):
        raise bad(f"depth maps for cameras {sorted(depth_ids - set(range(NUM_CAMERAS)))} of an 8-camera rig")
    h, w = image_size
    images, depths = [], []
    for k in range(NUM_CAMERAS):
        name = f"cam{k}.png"
        try:
            with open(os.path.join(sample_dir, name), "rb") as f:
                rgb = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        except IMAGE_ERRORS as err:
            raise bad(f"cannot read {name}: {one_line(err)}") from None
        if images and rgb.shape[:2] != images[0].shape[:2]:
            raise bad(
                f"{name} is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but cam0.png is "
                f"{images[0].shape[0]}x{images[0].shape[1]}"
            )
        if rgb.shape[:2] != (h, w):
            raise bad(f"{name} is {rgb.shape[0]}x{rgb.shape[1]} (HxW), the dataset's image_size is {h}x{w}")
        images.append(rgb)
        dname = f"depth{k}.png"
        if k in depth_ids:
            try:
                with open(os.path.join(sample_dir, dname), "rb") as f:
                    dm = decode_depth_png(f.read())
            except IMAGE_ERRORS as err:
                raise bad(f"cannot read {dname}: {one_line(err)}") from None
            if dm.shape != (h, w):
                raise bad(f"{dname} is {dm.shape[0]}x{dm.shape[1]} (HxW), its camera image is {h}x{w}")
        else:
            dm = np.zeros((h, w), dtype=np.float32)
        depths.append(dm)
    return images, depths


def _read_annotations(
    sample_dir: str,
    image_size: tuple[int, int],
    num_lanes: int,
    lane_points: int,
    bad: Callable[[str], DataError],
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(boxes in BOX_TYPE, lanes [8, L, P, 2], lane_exists [8, L]) from ``annotations.json``."""
    h, w = image_size
    ann_path = os.path.join(sample_dir, ANNOTATIONS)
    try:
        with open(ann_path) as f:
            ann = json.load(f)
    except (OSError, ValueError) as err:
        raise bad(f"cannot read {ANNOTATIONS}: {one_line(err)}") from None
    cameras = ann.get("cameras") if isinstance(ann, dict) else None
    if not isinstance(cameras, list) or len(cameras) != NUM_CAMERAS:
        found = len(cameras) if isinstance(cameras, list) else "no"
        raise bad(f"{ANNOTATIONS} must list {NUM_CAMERAS} cameras under 'cameras', found {found}")
    boxes: list[dict] = []
    lanes = np.zeros((NUM_CAMERAS, num_lanes, lane_points, 2), dtype=np.float32)
    exists = np.zeros((NUM_CAMERAS, num_lanes), dtype=bool)
    for k, entry in enumerate(cameras):
        entry = entry if isinstance(entry, dict) else {}
        for b in entry.get("boxes", []) or []:
            label = b.get("label") if isinstance(b, dict) else None
            if label not in CLASSES:
                raise bad(f"camera {k}: unknown class label {label!r} (classes: {', '.join(CLASSES)})")
            try:
                x1, y1, x2, y2 = (float(v) for v in b["xyxy"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"camera {k}: box xyxy must be 4 numbers, got {b.get('xyxy')!r}") from None
            if not (x2 > x1 and y2 > y1):
                raise bad(f"camera {k}: empty box {[x1, y1, x2, y2]} (needs x2 > x1 and y2 > y1)")
            if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1 or not np.isfinite([x1, y1, x2, y2]).all():
                raise bad(f"camera {k}: box {[x1, y1, x2, y2]} lies outside the {w}x{h} (WxH) image")
            boxes.append(
                {
                    "camera": k,
                    "label": CLASSES.index(label),
                    "x1": min(max(x1, 0.0), w),
                    "y1": min(max(y1, 0.0), h),
                    "x2": min(max(x2, 0.0), w),
                    "y2": min(max(y2, 0.0), h),
                }
            )
        for lane in entry.get("lanes", []) or []:
            slot = lane.get("slot") if isinstance(lane, dict) else None
            if not isinstance(slot, int) or not 0 <= slot < num_lanes:
                raise bad(
                    f"camera {k}: lane slot {slot!r} is not in 0..{num_lanes - 1} (num_lanes={num_lanes})"
                )
            if exists[k, slot]:
                raise bad(f"camera {k}: lane slot {slot} given twice")
            try:
                pts = np.asarray(lane["points"], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                raise bad(f"camera {k}: lane slot {slot} points must be [[u, v], ...]") from None
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2 or not np.isfinite(pts).all():
                raise bad(f"camera {k}: lane slot {slot} needs >= 2 finite [u, v] points")
            lanes[k, slot] = pts if len(pts) == lane_points else _resample_polyline(pts, lane_points)
            exists[k, slot] = True
    return boxes, lanes, exists


def rig_samples(path: str) -> list[str]:
    """The sample folders of a rig folder, by name; DataError naming a missing path."""
    if not os.path.exists(path):
        raise DataError(f"rig path not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"rig path is not a folder: {path}")
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def import_rig(
    path: str,
    image_size: Sequence[int],
    num_lanes: int,
    lane_points: int,
    on_bad_sample: str = "fail",
    skipped: list[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict]:
    """Yield :data:`SCHEMA` records from a rig folder (layout in the module docstring), by name order.

    A bad sample raises DataError naming it (``on_bad_sample="fail"``) or is left out and its
    id appended to ``skipped``. ``limit`` stops after that many records.
    """
    check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_POLICIES)
    size = image_hw(image_size)
    skipped = skipped if skipped is not None else []
    samples = rig_samples(path)
    if not samples:
        raise DataError(f"no rig samples in {path}: expected <sample_id>/cam0.png..cam7.png folders")
    count = 0
    for sid in samples:
        if limit is not None and count >= limit:
            return
        try:
            record = _read_rig_sample(os.path.join(path, sid), sid, size, num_lanes, lane_points)
        except DataError:
            if on_bad_sample == "fail":
                raise
            skipped.append(sid)
            continue
        yield record
        count += 1


def export_rig(records: Iterable[dict], path: str) -> int:
    """Write :data:`SCHEMA` records (e.g. from :func:`generate`) in the rig folder layout; returns the count."""
    os.makedirs(path, exist_ok=True)
    n = 0
    for r in records:
        sample_dir = os.path.join(path, r["sample_id"])
        os.makedirs(sample_dir, exist_ok=True)
        for k, (img, dep) in enumerate(zip(r["images"], r["depths"], strict=True)):
            with open(os.path.join(sample_dir, f"cam{k}.png"), "wb") as f:
                f.write(bytes(img))
            with open(os.path.join(sample_dir, f"depth{k}.png"), "wb") as f:
                f.write(bytes(dep))
        exists = np.asarray(r["lane_exists"], dtype=bool).reshape(NUM_CAMERAS, -1)
        lanes = np.asarray(r["lanes"], dtype=np.float32).reshape(NUM_CAMERAS, exists.shape[1], -1, 2)
        cameras: list[dict] = [{"boxes": [], "lanes": []} for _ in range(NUM_CAMERAS)]
        for b in r["boxes"]:
            # float32 -> float is exact and JSON keeps every digit: a re-import is bit-identical
            xyxy = [float(np.float32(b[k])) for k in ("x1", "y1", "x2", "y2")]
            cameras[int(b["camera"])]["boxes"].append({"label": CLASSES[int(b["label"])], "xyxy": xyxy})
        for k, slot in zip(*np.nonzero(exists), strict=True):
            cameras[k]["lanes"].append({"slot": int(slot), "points": lanes[k, slot].astype(float).tolist()})
        with open(os.path.join(sample_dir, ANNOTATIONS), "w") as f:
            json.dump({"cameras": cameras}, f)
        n += 1
    return n


def rig_fingerprint(path: str) -> str:
    """sha256 over every file's relative path, size and mtime: a changed rig is imported again."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
