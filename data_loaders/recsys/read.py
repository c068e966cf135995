"""Reading prepared shards back as model inputs: :func:`decode_batch` joins the catalogue."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from ..shards import iter_tables, open_split, read_dataset
from .catalogue import Catalogue, check_catalogue, load_catalogue
from .schema import EVENT_FEATURES, READ_COLUMNS

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data


# rows a training rank shuffles at a time (jobs.worker.train_batches' windows): many candidate
# lists, days and sessions in every batch
SHUFFLE_BUFFER_ROWS = 4096
# rows decoded by one call of decode_batch in a Ray Data task: per-batch overheads (Arrow to numpy
# and back, one output block each) cost more than decoding 256 rows does
DECODE_ROWS = 4096


def _ragged(col: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [B], flat values) of a list column: Arrow list array, 2-D ndarray or object array."""
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return lens, arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    col = np.asarray(col) if not isinstance(col, np.ndarray) else col
    if col.dtype != object:
        if col.ndim == 1:  # one value per row
            return np.ones(len(col), dtype=np.int64), col.astype(dtype, copy=False)
        return np.full(len(col), col.shape[1], dtype=np.int64), col.reshape(len(col), -1).reshape(-1).astype(
            dtype
        )
    lens = np.fromiter((len(x) for x in col), dtype=np.int64, count=len(col))
    if lens.sum() == 0:
        return lens, np.zeros(0, dtype=dtype)
    return lens, np.concatenate([np.asarray(x, dtype=dtype).reshape(-1) for x in col])


def candidate_inputs(cat: Catalogue, cand: np.ndarray) -> dict[str, np.ndarray]:
    """The catalogue's side of the model inputs for candidate indices (audio only when it has it)."""
    out = {
        "candidate": cand,
        "candidate_features": cat.features[cand],
        "candidate_acoustic": cat.acoustic[cand],
    }
    if cat.audio is not None:
        out["candidate_audio"] = cat.audio[cand].astype(np.float32)
    return out


def decode_batch(
    batch: dict[str, Any], root: str, history_len: int, event_features: int = len(EVENT_FEATURES)
) -> dict[str, np.ndarray]:
    """Stored rows -> model inputs, joining the catalogue at ``root`` (loaded once per process).

    B = rows, H = ``history_len``, F = ``event_features``. Returns ``query_id`` object [B],
    ``history_tracks`` int64 [B, H] (0-padded on the left, most recent last), ``history_features``
    float32 [B, H, F], ``history_mask`` bool [B, H], ``candidate`` int64 [B], ``candidate_features``
    float32 [B, F_track], ``candidate_acoustic`` float32 [B, 8], ``candidate_audio`` float32
    [B, n_mels, frames] (only with audio), ``context`` float32 [B, F_ctx], ``label`` float32 [B],
    ``is_negative`` bool [B], ``is_cold`` bool [B]. A stored history longer than H keeps its last H.
    """
    cat = load_catalogue(root)
    cand = _column(batch["candidate"]).astype(np.int64)
    B, H, F = len(cand), int(history_len), int(event_features)
    if len(cand) and (cand.min() < 1 or cand.max() >= cat.size):
        raise DataError(f"candidate index outside the catalogue of {root} (1..{cat.size - 1})")
    lens, tracks = _ragged(batch["history_tracks"], np.int64)
    flens, feats = _ragged(batch["history_features"], np.float32)
    if not np.array_equal(flens, lens * F):
        raise DataError(f"history_features do not hold {F} values per history track (dataset at {root})")
    _, ctx = _ragged(batch["context"], np.float32)
    hist = np.zeros((B, H), dtype=np.int64)
    hist_f = np.zeros((B, H, F), dtype=np.float32)
    mask = np.zeros((B, H), dtype=bool)
    row = np.repeat(np.arange(B), lens)
    within = np.arange(len(tracks)) - np.repeat(np.cumsum(lens) - lens, lens)
    col = H - lens[row] + within  # left padding; the most recent event sits at H - 1
    keep = col >= 0
    hist[row[keep], col[keep]] = tracks[keep]
    hist_f[row[keep], col[keep]] = feats.reshape(-1, F)[keep] if F else 0
    mask[row[keep], col[keep]] = True
    return {
        "query_id": np.asarray(_column(batch["query_id"])).astype(str).astype(object),
        "history_tracks": hist,
        "history_features": hist_f,
        "history_mask": mask,
        **candidate_inputs(cat, cand),
        "context": ctx.reshape(B, len(ctx) // max(B, 1)),
        "label": _column(batch["label"]).astype(np.float32),
        "is_negative": _column(batch["is_negative"]).astype(bool),
        "is_cold": _column(batch["is_cold"]).astype(bool),
    }


def _column(col: Any) -> np.ndarray:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_numpy(zero_copy_only=False)
    return np.asarray(col)


def read_split(
    root: str,
    split: str,
    manifest: dict | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    batch_size: int = DECODE_ROWS,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded ``split`` batches (keys as :func:`decode_batch`).

    Shards and catalogue are checked first, so a corrupt file is named. ``shuffle`` (training)
    reads the shards in a random order (``seed``); the consumer mixes rows in windows of
    :data:`SHUFFLE_BUFFER_ROWS` (it splits the candidate lists, which only val/test need). Both
    stream: a global ``random_shuffle`` per epoch is an all-to-all barrier (the first batch waits
    for the whole split, and the epoch reads at a fraction of the rate), and so is
    ``randomize_block_order`` (every read finishes before the first decode). Rows are decoded
    ``batch_size`` at a time straight from Arrow (list columns flatten without a numpy object per row).
    """
    manifest, paths = open_split(root, split, manifest)
    meta = manifest.get("meta", {})
    check_catalogue(root, meta)
    if shuffle:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    # read blocks of about one decode call each: Ray's default of 1 MiB blocks (~1,000 rows here)
    # pays a task and an object-store round trip per 1,000 rows
    blocks = max(1, math.ceil(manifest["splits"][split]["rows"] / batch_size))
    fn_kwargs = {
        "root": os.path.abspath(str(root)),
        "history_len": meta["history_len"],
        "event_features": meta["event_features"],
    }
    return read_dataset(paths, READ_COLUMNS, decode_batch, fn_kwargs, batch_size, "pyarrow", blocks)


def iter_split_numpy(
    root: str, split: str, batch_size: int, manifest: dict | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray).

    A batch may cut a candidate list; group by ``query_id`` for ranking metrics.
    """
    manifest, paths = open_split(root, split, manifest)
    meta = manifest.get("meta", {})
    check_catalogue(root, meta)
    kw = {"root": root, "history_len": meta["history_len"], "event_features": meta["event_features"]}
    for table in iter_tables(paths, READ_COLUMNS, batch_size):
        yield decode_batch(_table_batch(table), **kw)


def _table_batch(table: pa.Table) -> dict[str, Any]:
    return {name: table.column(name).combine_chunks() for name in table.column_names}
