"""Reading prepared shards back as model inputs: :func:`decode_batch`, through Ray Data or plain pyarrow."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..errors import DataError, one_line
from ..shards import IMAGE_ERRORS, iter_tables, open_split, read_dataset
from .schema import READ_COLUMNS
from .transform import preprocess_image

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, augment: bool, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Decode a batch of stored records for a model.

    Returns ``{"image": uint8 N x 3 x H x W, "label": int64 N, "image_id": str N}``. With
    ``seed`` the augmentation of each image depends only on (seed, image_id); vary the seed per
    epoch. Without it, augmentation is fresh randomness.
    """
    ids = np.asarray(batch["image_id"]).astype(str)
    out = np.empty((len(ids), 3, image_size, image_size), dtype=np.uint8)
    for i, (image_id, data) in enumerate(zip(ids, batch["image"], strict=True)):
        rng = None
        if augment:
            rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(image_id.encode())])
        try:
            out[i] = preprocess_image(bytes(data), image_size, augment=augment, rng=rng)
        except IMAGE_ERRORS as err:
            raise DataError(f"cannot decode image {image_id}: {one_line(err)}") from None
    return {
        "image": out,
        "label": np.asarray(batch["label"]).astype(np.int64),
        "image_id": ids.astype(object),
    }


def read_split(
    root: str, split: str, image_size: int, augment: bool, manifest: dict | None = None
) -> ray.data.Dataset:
    """A Ray Dataset of decoded ``split`` batches: columns image (3 x H x W uint8), label, image_id.

    The shards are checked first (:func:`~data_loaders.shards.open_split`), so a corrupt file is
    named before Ray Data fails on it with a message that does not say which file it was.
    """
    _, paths = open_split(root, split, manifest)
    fn_kwargs = {"image_size": image_size, "augment": augment}
    return read_dataset(paths, READ_COLUMNS, decode_batch, fn_kwargs, batch_size=64)


def iter_split_numpy(
    root: str, split: str, batch_size: int, image_size: int, manifest: dict | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray, no augmentation)."""
    _, paths = open_split(root, split, manifest)
    for table in iter_tables(paths, READ_COLUMNS, batch_size):
        yield _decode_table(table, image_size)


def _decode_table(table: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    batch = {
        "image_id": np.asarray(table.column("image_id").to_pylist(), dtype=object),
        "image": np.asarray(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
    }
    return decode_batch(batch, image_size, augment=False)
