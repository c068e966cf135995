"""``prepare``: a generator or an importer -> Parquet shards split by patient + manifest."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, overload

from ..errors import DataError
from ..shards import (
    ShardWriter,
    assign_split,
    check_fractions,
    import_limit,
    prepared_with,
    settings_of,
    sha256_file,
    warn_skipped,
)
from .eyepacs import LAYOUTS, detect_layout, import_images
from .schema import NUM_CLASSES, SCHEMA, SPLITS, TASK
from .settings import RetinopathySettings
from .synthetic import generate


def split_by_patient(
    records: Iterable[dict], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """Group records into train/val/test lists by :func:`assign_split` of their ``patient_id``
    (both eyes of a patient in one split)."""
    check_fractions(val_fraction, test_fraction)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        out[assign_split(r["patient_id"], val_fraction, test_fraction, seed)].append(r)
    return out


@overload
def prepare(settings: RetinopathySettings, /) -> dict: ...
@overload
def prepare(*args: Any, **fields: Any) -> dict: ...
def prepare(*args: Any, **fields: Any) -> dict:
    """Write the retinopathy dataset to ``settings.root`` (Parquet shards + manifest) and return the manifest.

    ``source`` is "synthetic", "eyepacs", "aptos" or "auto" (detected from ``import_path``). For
    imports, ``num_images`` caps the number of photos (0 or less: all). A ``root`` already holding
    a dataset prepared with the same settings is returned as is. ``prepare(source=..., root=..., ...)``
    gives the fields of :class:`RetinopathySettings` loose.
    """
    s = settings_of(RetinopathySettings, args, fields)
    root, source, import_path = str(s.root), s.source, s.import_path
    if source != "synthetic":
        if not import_path:
            raise DataError(f"data source {source!r} needs an import path (the folder with the labels CSV)")
        layout = detect_layout(import_path)
        if source != "auto" and layout != source:
            raise DataError(f"{import_path} holds a {layout} layout, not {source}")
        import_path = os.path.abspath(import_path)
        source = layout
        # Fingerprint the labels file too, so corrected labels are re-imported, not reused.
        labels_sha256 = sha256_file(os.path.join(import_path, LAYOUTS[layout][0]))
    else:
        layout, import_path, labels_sha256 = None, None, None
    args_meta = {
        "source": source,
        "image_size": s.image_size,
        "num_images": s.num_images,
        "label_noise": s.label_noise if layout is None else None,
        "seed": s.seed,
        "val_fraction": s.val_fraction,
        "test_fraction": s.test_fraction,
        "rows_per_shard": s.rows_per_shard,
        "import_path": import_path,
        "import_labels_sha256": labels_sha256,
        "on_bad_image": s.on_bad_image,
    }
    existing = prepared_with(root, TASK, args_meta)
    if existing is not None:
        return existing

    skipped: list[str] = []
    if layout is None:
        records: Iterable[dict] = generate(s.num_images, s.image_size, s.seed, s.label_noise)
    else:
        limit = import_limit(s.num_images)
        records = import_images(layout, import_path, s.image_size, s.on_bad_image, skipped, limit)
    counts = {split: [0] * NUM_CLASSES for split in SPLITS}
    with ShardWriter(root, TASK, SCHEMA, s.rows_per_shard, SPLITS) as writer:
        for r in records:
            split = assign_split(r["patient_id"], s.val_fraction, s.test_fraction, s.seed)
            writer.add(split, r)
            counts[split][r["label"]] += 1
        warn_skipped(skipped, "unreadable image(s)", import_path, root, "skipped_images")
        return writer.close({**args_meta, "class_counts": counts, "skipped_images": skipped})
