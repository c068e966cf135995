"""Parquet shards plus a ``manifest.json`` that describes and fingerprints them: writer and checks.

Layout written by :func:`write_splits` (or :class:`ShardWriter`)::

    root/manifest.json
    root/<split>/part-00000.parquet
    root/<split>/part-00001.parquet ...

The manifest is the commit point: it is written last and atomically, so a dataset directory either
has a manifest that matches its shards or no manifest at all.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError, one_line

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Rows per Parquet row group: small enough that a writer never holds a big slice of a split in
# memory (real fundus photos are hundreds of KB each), large enough to keep per-group overhead low.
_ROW_GROUP_ROWS = 256


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(shards: Iterable[tuple[str, str]]) -> str:
    """Hex sha256 over sorted ``(relative path, sha256)`` pairs: one id for the dataset's bytes."""
    h = hashlib.sha256()
    for path, digest in sorted(shards):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


class ShardWriter:
    """Write records of several splits in one pass, rolling shards every ``rows_per_shard`` rows.

    One pass matters for importers: routing each decoded photo to its split as it arrives means
    the source is read once and no split is held in memory. Use as a context manager or call
    :meth:`close`; :meth:`close` writes the manifest and returns it.
    """

    def __init__(
        self,
        root: str,
        task: str,
        schema: pa.Schema,
        rows_per_shard: int,
        splits: Sequence[str],
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.root = str(root)
        self.task = task
        self.schema = schema
        self.rows_per_shard = int(rows_per_shard)
        self.splits = list(splits)
        self._names = schema.names
        self._buffers: dict[str, list[dict]] = {s: [] for s in self.splits}
        self._writers: dict[str, pq.ParquetWriter | None] = dict.fromkeys(self.splits)
        self._shard_rows: dict[str, int] = dict.fromkeys(self.splits, 0)
        self._shards: dict[str, list[dict]] = {s: [] for s in self.splits}
        self._closed = False
        os.makedirs(self.root, exist_ok=True)
        # Drop the old manifest first: if this run dies half-way, no manifest may point at shards
        # that are being overwritten. Stale shards of a previous, larger run would otherwise linger.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.root, MANIFEST))
        for split in self.splits:
            os.makedirs(os.path.join(self.root, split), exist_ok=True)
            for old in glob.glob(os.path.join(self.root, split, "part-*.parquet")):
                os.remove(old)

    def add(self, split: str, record: dict) -> None:
        """Append one record (a dict with the schema's columns) to ``split``."""
        buf = self._buffers[split]
        buf.append(record)
        room = self.rows_per_shard - self._shard_rows[split]
        if len(buf) >= min(_ROW_GROUP_ROWS, room):
            self._flush(split)

    def _flush(self, split: str) -> None:
        buf = self._buffers[split]
        if not buf:
            return
        table = pa.Table.from_pylist(buf, schema=self.schema)
        self._buffers[split] = []
        writer = self._writers[split]
        if writer is None:
            rel = f"{split}/part-{len(self._shards[split]):05d}.parquet"
            writer = pq.ParquetWriter(os.path.join(self.root, rel), self.schema)
            self._writers[split] = writer
            self._shards[split].append({"path": rel})
        writer.write_table(table)
        self._shard_rows[split] += table.num_rows
        if self._shard_rows[split] >= self.rows_per_shard:
            self._close_shard(split)

    def _close_shard(self, split: str) -> None:
        writer = self._writers[split]
        if writer is None:
            return
        writer.close()
        entry = self._shards[split][-1]
        path = os.path.join(self.root, entry["path"])
        entry.update(rows=self._shard_rows[split], bytes=os.path.getsize(path), sha256=sha256_file(path))
        self._writers[split] = None
        self._shard_rows[split] = 0

    def close(self, meta: dict | None = None) -> dict:
        """Finish every shard, write ``manifest.json`` atomically and return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        for split in self.splits:
            self._flush(split)
            self._close_shard(split)
        self._closed = True
        manifest = {
            "task": self.task,
            "format_version": FORMAT_VERSION,
            "schema": [{"name": f.name, "type": str(f.type)} for f in self.schema],
            "splits": {
                s: {"rows": sum(sh["rows"] for sh in self._shards[s]), "shards": self._shards[s]}
                for s in self.splits
            },
            "fingerprint": fingerprint(
                (sh["path"], sh["sha256"]) for s in self.splits for sh in self._shards[s]
            ),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "meta": meta or {},
        }
        _write_json_atomic(os.path.join(self.root, MANIFEST), manifest)
        return manifest

    def abort(self) -> None:
        """Close open files without writing a manifest (the directory stays 'not a dataset')."""
        for split in self.splits:
            writer = self._writers[split]
            if writer is not None:
                writer.close()
                self._writers[split] = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_splits(
    root: str,
    task: str,
    splits: dict[str, Iterable[dict]],
    schema: pa.Schema,
    rows_per_shard: int,
    meta: dict | None = None,
) -> dict:
    """Write each split's records as Parquet shards of at most ``rows_per_shard`` rows, then the manifest.

    Parameters
    ----------
    root : dataset directory (created if needed).
    task : task name recorded in the manifest.
    splits : split name -> iterable of records; consumed once, streaming.
    schema : Arrow schema of the records.
    rows_per_shard : maximum rows per shard file.
    meta : free-form JSON-able metadata stored under ``manifest["meta"]``.

    Returns
    -------
    dict : the manifest.
    """
    with ShardWriter(root, task, schema, rows_per_shard, list(splits)) as writer:
        for split, records in splits.items():
            for record in records:
                writer.add(split, record)
        return writer.close(meta)


def load_manifest(root: str) -> dict:
    """Read ``root/manifest.json``; DataError if there is no dataset there."""
    path = os.path.join(str(root), MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"no dataset at {root}: {MANIFEST} is missing (run `deepfleet prepare` first)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"unreadable manifest {path}: {one_line(err)}") from None
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise DataError(f"unreadable manifest {path}: no 'splits' entry")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"manifest {path} has format_version {manifest.get('format_version')!r}, "
            f"this deepfleet reads {FORMAT_VERSION} (prepare the data again)"
        )
    return manifest


def _split_entry(root: str, manifest: dict, split: str) -> dict:
    try:
        return manifest["splits"][split]
    except KeyError:
        have = ", ".join(manifest.get("splits", {})) or "none"
        raise DataError(f"dataset at {root} has no split {split!r} (splits: {have})") from None


def shard_paths(root: str, manifest: dict, split: str) -> list[str]:
    """Absolute paths of ``split``'s shards, in manifest order."""
    entry = _split_entry(root, manifest, split)
    return [os.path.abspath(os.path.join(str(root), sh["path"])) for sh in entry["shards"]]


def verify(root: str, manifest: dict, splits: Iterable[str] | None = None, check_hash: bool = False) -> None:
    """Check that the shards of ``splits`` (default: all) exist, are Parquet, and match the manifest.

    Reads only Parquet footers unless ``check_hash``; raises DataError naming the first bad shard.
    Ray Data's own error for a corrupt file does not say which file it was, hence this check.
    """
    root = str(root)
    for split in manifest["splits"] if splits is None else splits:
        for sh in _split_entry(root, manifest, split)["shards"]:
            path = os.path.join(root, sh["path"])
            rows = parquet_rows(path, "Parquet shard", root)
            if rows != sh["rows"]:
                raise DataError(f"Parquet shard {path} has {rows} rows, the manifest says {sh['rows']}")
            if check_hash and sha256_file(path) != sh["sha256"]:
                raise DataError(f"Parquet shard {path} changed since it was written (sha256 mismatch)")


def reusable(root: str, task: str, matches: Callable[[dict], bool]) -> dict | None:
    """The manifest at ``root`` if it holds ``task`` data whose meta ``matches`` the requested
    preparation; None if there is none or it differs. Missing or damaged shards of a matching
    dataset are an error naming the file, not a reason to regenerate in silence."""
    try:
        manifest = load_manifest(root)
    except DataError:
        return None
    if manifest.get("task") != task or not matches(manifest.get("meta", {})):
        return None
    verify(root, manifest)
    return manifest


def parquet_rows(path: str, what: str, root: str) -> int:
    """Rows of a Parquet file the manifest at `root` lists; one line naming `what` when it is
    missing or does not read."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what} {path} (listed in {os.path.join(root, MANIFEST)})")
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise DataError(f"corrupt {what} {path}: {one_line(err)}") from None
