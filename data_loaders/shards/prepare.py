"""The skeleton every task's ``prepare`` shares: settings checks, hashed splits, reuse, skip reports.

A task's ``prepare(settings)`` checks its settings (the helpers here raise one-line DataErrors),
returns the dataset already at ``root`` when it was prepared with the same arguments
(:func:`prepared_with`), streams records from a generator or an importer into a
:class:`~data_loaders.shards.ShardWriter` (:func:`assign_split` when the split comes from a
hash of an id), reports what an importer skipped (:func:`warn_skipped`) and commits the manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ..errors import DataError
from .manifest import MANIFEST, reusable

S = TypeVar("S")

# What PIL raises for bytes that are not a readable image (callers name the image in a DataError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def settings_of(cls: type[S], args: tuple[Any, ...], fields: dict[str, Any]) -> S:
    """The settings of ``prepare(settings)``; the loose ``prepare(source, root, ...)`` form (scripts,
    tests) passes the same fields as arguments, gathered into ``cls`` and so checked the same way."""
    if len(args) == 1 and not fields and isinstance(args[0], cls):
        return args[0]
    return cls(*args, **fields)


def check_source(source: str, sources: Sequence[str]) -> None:
    if source not in sources:
        raise DataError(f"unknown data source {source!r}: choose one of {', '.join(sources)}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DataError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_at_least(**values: tuple[float, float]) -> None:
    """``name=(value, low)`` pairs: DataError naming the first value below its ``low``."""
    for name, (value, low) in values.items():
        if value < low:
            raise DataError(f"{name} must be >= {low}, got {value}")


def check_fractions(val_fraction: float, test_fraction: float, positive: bool = False) -> None:
    """Split shares: each >= 0 (> 0 with ``positive``) and some data left for training."""
    low = min(val_fraction, test_fraction)
    if (low <= 0 if positive else low < 0) or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 (some data left for training) and each "
            f"{'>' if positive else '>='} 0, got {val_fraction} and {test_fraction}"
        )


def assign_split(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Return the split ("train", "val" or "test") of a record id (a patient, a rig) from a seeded hash.

    Hashing (instead of shuffling a list) keeps the records of one key together, needs no memory
    for huge datasets, and gives a key the same split whatever else is in the dataset.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def import_limit(count: int) -> int | None:
    """An importer's record cap from a ``num_*`` setting: 0 or less imports everything."""
    return count if count and count > 0 else None


def prepared_with(root: str, task: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if its meta holds every ``args`` value (see :func:`reusable`)."""
    return reusable(root, task, lambda meta: all(meta.get(k) == v for k, v in args.items()))


def warn_skipped(skipped: list[str], what: str, source: str | None, root: str, key: str) -> None:
    """One stderr line naming the first records an importer left out (all of them are in meta[key])."""
    if not skipped:
        return
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    print(
        f"warning: skipped {len(skipped)} {what} from {source}: {shown} "
        f"(listed in {os.path.join(root, MANIFEST)} meta.{key})",
        file=sys.stderr,
    )


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an H x W x 3 uint8 array: how records store camera and fundus photos."""
    buf = io.BytesIO()
    # Level 1: noisy photos shrink only ~10% more at level 6, which costs ~50% more encode time.
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
