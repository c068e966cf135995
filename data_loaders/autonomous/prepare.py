"""``prepare``: a generator or a rig folder -> Parquet shards + ``stats.npz`` + manifest."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from typing import Any, overload

import numpy as np

from ..errors import DataError, one_line
from ..shards import ShardWriter, assign_split, import_limit, prepared_with, settings_of, warn_skipped
from .rig import import_rig, rig_fingerprint, rig_samples
from .schema import CLASSES, NUM_CAMERAS, SCHEMA, SPLITS, STATS_FILE, TASK, decode_depth_png
from .settings import AutonomousSettings
from .synthetic import generate


class _Stats:
    """Training-split running sums for the trivial baselines in ``stats.npz``."""

    def __init__(self, h: int, w: int, num_lanes: int, lane_points: int) -> None:
        self.h, self.w = h, w
        self.depth_sum = np.zeros((NUM_CAMERAS, h, w))
        self.depth_n = np.zeros((NUM_CAMERAS, h, w), dtype=np.int64)
        self.lane_sum = np.zeros((NUM_CAMERAS, num_lanes, lane_points, 2))
        self.lane_n = np.zeros((NUM_CAMERAS, num_lanes), dtype=np.int64)
        self.samples = 0

    def add(self, r: dict) -> None:
        depth = np.stack([decode_depth_png(bytes(b)) for b in r["depths"]])
        valid = depth > 0
        self.depth_sum += np.where(valid, depth, 0)
        self.depth_n += valid
        exists = np.asarray(r["lane_exists"], dtype=bool).reshape(self.lane_n.shape)
        lanes = np.asarray(r["lanes"], dtype=np.float64).reshape(self.lane_sum.shape) / (self.w, self.h)
        self.lane_sum += np.where(exists[..., None, None], lanes, 0)
        self.lane_n += exists
        self.samples += 1

    def write(self, path: str) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_depth = np.where(self.depth_n > 0, self.depth_sum / self.depth_n, 0)
            mean_lanes = np.where(
                self.lane_n[..., None, None] > 0, self.lane_sum / self.lane_n[..., None, None], 0
            )
        rate = self.lane_n / max(self.samples, 1)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                mean_depth=mean_depth.astype(np.float32),
                mean_lanes=mean_lanes.astype(np.float32),
                lane_exists_rate=rate.astype(np.float32),
                train_samples=np.int64(self.samples),
            )
        os.replace(tmp, path)


def train_statistics(root: str) -> dict[str, np.ndarray]:
    """The training-split statistics :func:`prepare` wrote to ``root/stats.npz``.

    ``mean_depth`` float32 [8, H, W] (mean over valid pixels; 0 where never valid),
    ``mean_lanes`` float32 [8, L, P, 2] ((u, v) / (W, H), averaged where the lane exists; 0 where
    it never does), ``lane_exists_rate`` float32 [8, L], ``train_samples`` int64.
    """
    path = os.path.join(str(root), STATS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"no training statistics at {path} (run `deepfleet prepare` first)")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error) as err:
        raise DataError(f"unreadable training statistics {path}: {one_line(err)}") from None


@overload
def prepare(settings: AutonomousSettings, /) -> dict: ...
@overload
def prepare(*args: Any, **fields: Any) -> dict: ...
def prepare(*args: Any, **fields: Any) -> dict:
    """Write the autonomous dataset to ``settings.root`` (shards, ``stats.npz``, manifest) and return the manifest.

    ``source`` is "synthetic" (scenes of 1..``max_boxes`` objects, so no camera holds more boxes)
    or "rig" (a folder at ``import_path``, layout in :mod:`.rig`; ``num_samples`` caps it,
    0 or less: all; every box is kept, ``decode_batch`` caps them per camera). Splits come from a
    seeded hash of the sample id. A ``root`` already holding a dataset prepared with the same
    settings is returned as is. ``prepare(source=..., root=..., ...)`` gives the fields of
    :class:`AutonomousSettings` loose.
    """
    s = settings_of(AutonomousSettings, args, fields)
    (h, w), root = s.image_size, str(s.root)
    import_path, fingerprint = None, None
    if s.source == "rig":
        if not s.import_path:
            raise DataError("data source 'rig' needs an import path (the folder of <sample_id>/ rigs)")
        import_path = os.path.abspath(s.import_path)
        rig_samples(import_path)  # a missing folder is named before anything is written
        fingerprint = rig_fingerprint(import_path)
    args_meta = {
        "source": s.source,
        "image_size": [h, w],
        "num_samples": s.num_samples,
        "seed": s.seed,
        "max_boxes": s.max_boxes if s.source == "synthetic" else None,  # imports keep every box
        "num_lanes": s.num_lanes,
        "lane_points": s.lane_points,
        "val_fraction": s.val_fraction,
        "test_fraction": s.test_fraction,
        "rows_per_shard": s.rows_per_shard,
        "import_path": import_path,
        "import_fingerprint": fingerprint,
        "on_bad_sample": s.on_bad_sample,
    }
    existing = _existing(root, args_meta)
    if existing is not None:
        return existing

    skipped: list[str] = []
    if s.source == "synthetic":
        records: Iterable[dict] = generate(
            s.num_samples, (h, w), s.seed, s.max_boxes, s.num_lanes, s.lane_points
        )
    else:
        limit = import_limit(s.num_samples)
        records = import_rig(import_path, (h, w), s.num_lanes, s.lane_points, s.on_bad_sample, skipped, limit)
    counts = {split: dict.fromkeys(CLASSES, 0) for split in SPLITS}
    stats = _Stats(h, w, s.num_lanes, s.lane_points)
    with ShardWriter(root, TASK, SCHEMA, s.rows_per_shard, SPLITS) as writer:
        for r in records:
            split = assign_split(r["sample_id"], s.val_fraction, s.test_fraction, s.seed)
            writer.add(split, r)
            for b in r["boxes"]:
                counts[split][CLASSES[b["label"]]] += 1
            if split == "train":
                stats.add(r)
        warn_skipped(skipped, "bad rig sample(s)", import_path, root, "skipped_samples")
        # statistics before the manifest: the manifest commits the dataset, stats.npz included
        stats.write(os.path.join(root, STATS_FILE))
        meta = {
            **args_meta,
            "classes": list(CLASSES),
            "num_cameras": NUM_CAMERAS,
            "box_counts": counts,
            "skipped_samples": skipped,
        }
        return writer.close(meta)


def _existing(root: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if it was prepared with ``args``; None if there is none or it differs.

    Missing or damaged shards (or statistics) of a matching dataset are an error naming the file.
    """
    manifest = prepared_with(root, TASK, args)
    if manifest is not None:
        train_statistics(root)
    return manifest
