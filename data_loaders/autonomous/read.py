"""Reading prepared shards back as model inputs, and :func:`preprocess_images`, the transform serving reuses."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import DataError, one_line
from ..shards import IMAGE_ERRORS, iter_tables, open_split, read_dataset
from .camera import image_hw
from .schema import NUM_CAMERAS, READ_COLUMNS, box_field, decode_depth_png

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data


def _jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation per camera on float [8, H, W, 3] in [0, 1]; geometry untouched."""
    n = x.shape[0]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    bright = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    colour = rng.uniform(0.92, 1.08, (n, 1, 1, 3)).astype(np.float32)
    x = ((x - mean) * contrast + mean * bright) * colour
    sigma = rng.uniform(0, 0.02, (n, 1, 1, 1)).astype(np.float32)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
    return np.clip(x, 0, 1)


def preprocess_images(
    images: Sequence[np.ndarray],
    image_size: Sequence[int] | None = None,
    augment: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """8 uint8 H x W x 3 camera images (camera order) -> uint8 [8, 3, H, W].

    The one transform that training (via :func:`decode_batch`), evaluation and serving use.
    Pixels stay uint8 until they reach the model's device, where the task normalises them with
    MEAN and STD (jobs.tasks.normalised): a quarter of the bytes through Ray and the bus.
    Raises DataError for a wrong camera count, a non-RGB image, or a size other than
    ``image_size`` (H, W) or the first camera's.
    """
    if len(images) != NUM_CAMERAS:
        raise DataError(f"expected {NUM_CAMERAS} camera images, got {len(images)}")
    arrs = [np.asarray(im) for im in images]
    want = tuple(image_size) if image_size is not None else arrs[0].shape[:2]
    for k, a in enumerate(arrs):
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise DataError(f"camera {k} image must be uint8 H x W x 3, got {a.dtype} {a.shape}")
        if a.shape[:2] != want:
            raise DataError(
                f"camera {k} image is {a.shape[0]}x{a.shape[1]} (HxW), expected {want[0]}x{want[1]}"
            )
    x = np.stack(arrs)
    if augment:
        x = _jitter(
            x.astype(np.float32) / np.float32(255.0), rng if rng is not None else np.random.default_rng()
        )
        x = np.rint(x * 255).astype(np.uint8)  # _jitter clips to [0, 1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decode_batch(
    batch: dict[str, Any],
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    augment: bool,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode stored rig records for a model (B = rows, C = 8 cameras, M = max_boxes).

    Returns ``sample_id`` object [B], ``images`` uint8 [B, C, 3, H, W],
    ``depth`` float32 [B, C, H, W] (metres, 0 = invalid), ``boxes`` float32 [B, C, M, 4]
    (xyxy / (W, H), zero padded), ``box_labels`` int64 [B, C, M] (-1 padded; a camera with more
    than M boxes keeps its M largest), ``lanes`` float32 [B, C, L, P, 2] ((u, v) / (W, H)) and
    ``lane_exists`` float32 [B, C, L]. ``augment`` jitters colours only; with ``seed`` it depends
    only on (seed, sample_id).
    """
    h, w = image_hw(image_size)
    ids = [str(s) for s in batch["sample_id"]]
    n = len(ids)
    out = {
        "sample_id": np.asarray(ids, dtype=object),
        "images": np.empty((n, NUM_CAMERAS, 3, h, w), dtype=np.uint8),
        "depth": np.empty((n, NUM_CAMERAS, h, w), dtype=np.float32),
        "boxes": np.zeros((n, NUM_CAMERAS, max_boxes, 4), dtype=np.float32),
        "box_labels": np.full((n, NUM_CAMERAS, max_boxes), -1, dtype=np.int64),
        "lanes": np.empty((n, NUM_CAMERAS, num_lanes, lane_points, 2), dtype=np.float32),
        "lane_exists": np.empty((n, NUM_CAMERAS, num_lanes), dtype=np.float32),
    }
    scale = np.array([w, h], dtype=np.float32)
    for i, sid in enumerate(ids):
        rng = None
        if augment:
            rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(sid.encode())])
        try:
            rgbs = [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in batch["images"][i]]
            depths = [decode_depth_png(bytes(b)) for b in batch["depths"][i]]
        except IMAGE_ERRORS as err:
            raise DataError(f"cannot decode images of sample {sid}: {one_line(err)}") from None
        try:
            out["images"][i] = preprocess_images(rgbs, (h, w), augment=augment, rng=rng)
        except DataError as err:
            raise DataError(f"sample {sid}: {err}") from None
        if len(depths) != NUM_CAMERAS or any(dm.shape != (h, w) for dm in depths):
            raise DataError(f"sample {sid}: expected {NUM_CAMERAS} depth maps of {h}x{w} (HxW)")
        out["depth"][i] = np.stack(depths)
        lanes = np.asarray(batch["lanes"][i], dtype=np.float32)
        exists = np.asarray(batch["lane_exists"][i], dtype=np.float32)
        if lanes.size != NUM_CAMERAS * num_lanes * lane_points * 2 or exists.size != NUM_CAMERAS * num_lanes:
            raise DataError(
                f"sample {sid} has {lanes.size} lane values and {exists.size} lane flags, expected "
                f"{NUM_CAMERAS} cameras x num_lanes={num_lanes} x lane_points={lane_points}"
            )
        out["lanes"][i] = lanes.reshape(NUM_CAMERAS, num_lanes, lane_points, 2) / scale
        out["lane_exists"][i] = exists.reshape(NUM_CAMERAS, num_lanes)
        try:
            _fill_boxes(batch["boxes"][i], out["boxes"][i], out["box_labels"][i], w, h, max_boxes)
        except (IndexError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"bad boxes in sample {sid}: {one_line(err)}") from None
    return out


def _fill_boxes(boxes: Iterable, xyxy: np.ndarray, labels: np.ndarray, w: int, h: int, m: int) -> None:
    per_cam: list[list[tuple[float, int, tuple]]] = [[] for _ in range(NUM_CAMERAS)]
    for b in boxes:
        cam = int(box_field(b, "camera", 0))
        if not 0 <= cam < NUM_CAMERAS:
            raise ValueError(f"camera {cam} of an {NUM_CAMERAS}-camera rig")
        x1, y1, x2, y2 = (float(box_field(b, k, 2 + i)) for i, k in enumerate(("x1", "y1", "x2", "y2")))
        per_cam[cam].append(
            ((x2 - x1) * (y2 - y1), int(box_field(b, "label", 1)), (x1 / w, y1 / h, x2 / w, y2 / h))
        )
    for cam, items in enumerate(per_cam):
        if len(items) > m:  # keep the largest, in their stored order
            keep = sorted(sorted(range(len(items)), key=lambda j: -items[j][0])[:m])
            items = [items[j] for j in keep]
        for j, (_, label, box) in enumerate(items):
            xyxy[cam, j] = np.clip(box, 0, 1)
            labels[cam, j] = label


def read_split(
    root: str,
    split: str,
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    augment: bool,
    manifest: dict | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded ``split`` batches (columns as :func:`decode_batch` returns them).

    The shards are checked first (:func:`~data_loaders.shards.open_split`), so a corrupt file is
    named before Ray Data fails on it with a message that does not say which file it was.
    """
    _, paths = open_split(root, split, manifest)
    fn_kwargs = {
        "image_size": tuple(image_size),
        "max_boxes": max_boxes,
        "num_lanes": num_lanes,
        "lane_points": lane_points,
        "augment": augment,
    }
    # a decoded rig is 8 images: small batches keep Ray Data's blocks small
    return read_dataset(paths, READ_COLUMNS, decode_batch, fn_kwargs, batch_size=16)


def iter_split_numpy(
    root: str,
    split: str,
    batch_size: int,
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    manifest: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray, no augmentation)."""
    _, paths = open_split(root, split, manifest)
    kw = {
        "image_size": image_size,
        "max_boxes": max_boxes,
        "num_lanes": num_lanes,
        "lane_points": lane_points,
    }
    for table in iter_tables(paths, READ_COLUMNS, batch_size):
        yield decode_batch(table.to_pydict(), augment=False, **kw)
