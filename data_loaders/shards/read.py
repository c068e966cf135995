"""Reading a split back: checked shard paths, then Ray Data or plain pyarrow batches through a task's decode.

Every task reads the same way: :func:`open_split` checks the split's shards against the manifest
(Ray Data's error for a corrupt file does not say which file it was), :func:`read_dataset` builds
the Ray Dataset that training consumes, and :func:`iter_tables` gives the same rows in file order
without Ray (evaluation, benchmarks, tests). A task supplies only its columns and decode function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from .manifest import load_manifest, shard_paths, verify

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data


def readable_paths(root: str, manifest: dict, split: str) -> list[str]:
    """``split``'s shard paths after :func:`verify` (a corrupt file is named before Ray Data or
    pyarrow fail on it without saying which); DataError if the split is empty."""
    verify(root, manifest, [split])
    paths = shard_paths(root, manifest, split)
    if not paths:
        raise DataError(f"split {split!r} of the dataset at {root} is empty")
    return paths


def open_split(root: str, split: str, manifest: dict | None = None) -> tuple[dict, list[str]]:
    """(manifest, checked shard paths of ``split``); the manifest is read from ``root`` unless given."""
    manifest = manifest if manifest is not None else load_manifest(root)
    return manifest, readable_paths(root, manifest, split)


def read_dataset(
    paths: list[str],
    columns: list[str],
    decode: Callable[..., dict],
    fn_kwargs: dict[str, Any],
    batch_size: int,
    batch_format: str = "numpy",
    blocks: int | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of ``decode(batch, **fn_kwargs)`` over the shards at ``paths``.

    Only ``columns`` are read (the projection is pushed down into the Parquet read); ``blocks``
    overrides Ray Data's read parallelism.
    """
    import ray.data

    ds = ray.data.read_parquet(paths, override_num_blocks=blocks).select_columns(columns)
    return ds.map_batches(decode, fn_kwargs=fn_kwargs, batch_format=batch_format, batch_size=batch_size)


def iter_tables(paths: Iterable[str], columns: list[str], batch_size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``batch_size`` rows (the last one may be shorter) across shard
    boundaries, in file order, with plain pyarrow."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for path in paths:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            pending.append(rb)
            rows += rb.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_size)
                rest = table.slice(batch_size)
                pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)
