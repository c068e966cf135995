"""The track catalogue: features from the published columns, ``tracks.parquet`` written and loaded."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError, one_line
from ..shards.manifest import parquet_rows
from .schema import ACOUSTIC_DIM, NUMERIC_TRACK, TRACKS_FILE, TRACKS_SCHEMA


def track_feature_matrix(
    tracks: pa.Table, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, F_track] float32, acoustic vectors [N, 8] float32, valid rows bool [N]).

    Numeric columns (:data:`TRACK_FEATURES` order; duration as log seconds) are z-scored with
    ``mean``/``std`` (the prepared dataset's ``meta["track_feature_stats"]``, so a new track at serving
    time is encoded as in training); without them they come back raw. A row with an empty or NaN
    value is not valid.
    """
    n = tracks.num_rows
    ok = np.ones(n, dtype=bool)

    def num(name: str) -> np.ndarray:
        col = tracks.column(name)
        v = pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        ok[~np.isfinite(v)] = False
        return np.nan_to_num(v)

    raw = np.stack([num(c) for c in NUMERIC_TRACK], 1)
    raw[:, 0] = np.log(np.maximum(raw[:, 0], 1.0))
    if mean is not None and std is not None:
        raw = (raw - mean) / std
    key = num("key") * (2 * math.pi / 12)
    mode_col = tracks.column("mode")
    if pa.types.is_string(mode_col.type):
        major = pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(mode_col)), "major")
        minor = pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(mode_col)), "minor")
        numeric = pc.is_in(pc.utf8_trim_whitespace(mode_col), value_set=pa.array(["0", "1"]))
        ok &= pc.fill_null(pc.or_(pc.or_(major, minor), numeric), False).to_numpy(zero_copy_only=False)
        mode = pc.fill_null(pc.or_(major, pc.equal(pc.utf8_trim_whitespace(mode_col), "1")), False)
        mode = mode.to_numpy(zero_copy_only=False).astype(np.float32)
    else:
        mode = (num("mode") > 0).astype(np.float32)
    ts = num("time_signature")
    feats = np.concatenate(
        [
            raw,
            np.stack([np.sin(key), np.cos(key), mode], 1),
            np.stack([ts == 3, ts == 4, ts == 5], 1),
        ],
        axis=1,
    ).astype(np.float32)
    acoustic = np.stack([num(f"acoustic_vector_{i}") for i in range(ACOUSTIC_DIM)], 1).astype(np.float32)
    return feats, acoustic, ok


def standardise(feats: np.ndarray, warm: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    k = len(NUMERIC_TRACK)
    ref = feats[warm, :k] if warm.any() else feats[:, :k]
    mean = ref.astype(np.float64).mean(0)
    std = ref.astype(np.float64).std(0)
    std[std < 1e-8] = 1.0
    out = feats.copy()
    out[:, :k] = (feats[:, :k] - mean) / std
    return out, mean.tolist(), std.tolist()


def write_catalogue(
    path: str,
    track_ids: np.ndarray,
    feats: np.ndarray,
    acoustic: np.ndarray,
    audio: Callable[[int, int], np.ndarray] | None,
    audio_shape: list[int] | None,
    is_cold: np.ndarray,
    release_date: np.ndarray,
    popularity: np.ndarray,
    listens: np.ndarray,
    chunk: int = 4096,
) -> None:
    """Write ``tracks.parquet`` (catalogue rows 1..N) in chunks, atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    n = len(track_ids)
    shape = ",".join(map(str, audio_shape or []))
    with pq.ParquetWriter(tmp, TRACKS_SCHEMA.with_metadata({"audio_shape": shape})) as writer:
        for lo in range(0, max(n, 1), chunk):
            hi = min(n, lo + chunk)
            if hi <= lo:
                break
            if audio is not None:
                a = audio(lo, hi)
                audio_col = pa.ListArray.from_arrays(
                    np.arange(hi - lo + 1, dtype=np.int32) * a[0].size, pa.array(a.reshape(-1))
                )
            else:
                audio_col = pa.array([[]] * (hi - lo), type=pa.list_(pa.float16()))
            writer.write_table(
                pa.table(
                    {
                        "track_id": pa.array(track_ids[lo:hi], type=pa.string()),
                        "index": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int32)),
                        "features": _fixed_list(feats[lo:hi]),
                        "acoustic_vector": _fixed_list(acoustic[lo:hi]),
                        "audio": audio_col,
                        "is_cold": pa.array(is_cold[lo:hi]),
                        "release_date": pa.array(release_date[lo:hi], type=pa.string()),
                        "popularity": pa.array(popularity[lo:hi].astype(np.int64)),
                        "listens": pa.array(listens[lo:hi].astype(np.int64)),
                    },
                    schema=TRACKS_SCHEMA,
                )
            )
    os.replace(tmp, path)


def _fixed_list(x: np.ndarray) -> pa.ListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    offsets = np.arange(len(x) + 1, dtype=np.int32) * x.shape[1]
    return pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))


def check_catalogue(root: str, meta: dict) -> None:
    path = os.path.join(str(root), TRACKS_FILE)
    rows = parquet_rows(path, "catalogue", str(root))
    if rows != meta.get("tracks_rows"):
        raise DataError(f"catalogue {path} has {rows} tracks, the manifest says {meta.get('tracks_rows')}")


@dataclass(frozen=True)
class Catalogue:
    """``tracks.parquet`` as arrays indexed by catalogue index (row 0 = padding, all zeros)."""

    track_id: np.ndarray  # object [N + 1]
    features: np.ndarray  # float32 [N + 1, F_track]
    acoustic: np.ndarray  # float32 [N + 1, 8]
    audio: np.ndarray | None  # float16 [N + 1, n_mels, frames]; None without audio
    is_cold: np.ndarray  # bool [N + 1]
    popularity: np.ndarray  # int64 [N + 1]
    listens: np.ndarray  # int64 [N + 1]
    release_date: np.ndarray  # object [N + 1], None where unknown

    @property
    def size(self) -> int:
        """Rows including the padding row: the embedding table size."""
        return len(self.track_id)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Track id -> catalogue index (serving looks requests up by id)."""
        return {str(t): i for i, t in enumerate(self.track_id) if i}

    def lookup(self, track_ids: Sequence[str], what: str) -> np.ndarray:
        """Catalogue indices of ``track_ids``; DataError naming the unknown ones."""
        index = self.index
        unknown = [t for t in track_ids if t not in index]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(f"unknown track id in {what}: {shown} (not in the model's catalogue)")
        return np.fromiter((index[t] for t in track_ids), dtype=np.int64, count=len(track_ids))


_CATALOGUES: dict[str, tuple[tuple[int, int], Catalogue]] = {}


def load_catalogue(root: str) -> Catalogue:
    """The catalogue of the dataset at ``root``, loaded once per process (cached by path and mtime)."""
    path = os.path.abspath(os.path.join(str(root), TRACKS_FILE))
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"missing catalogue {path} (run `deepfleet prepare` first)") from None
    key = (st.st_mtime_ns, st.st_size)
    hit = _CATALOGUES.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        t = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise DataError(f"corrupt catalogue {path}: {one_line(err)}") from None
    n = t.num_rows
    index = t.column("index").to_numpy()
    if not np.array_equal(index, np.arange(1, n + 1)):
        raise DataError(f"catalogue {path}: column index is not 1..{n} in order")

    def matrix(name: str, dtype: Any) -> np.ndarray:
        col = t.column(name).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype)
        width = len(flat) // n if n else 0
        out = np.zeros((n + 1, width), dtype=dtype)
        out[1:] = flat.reshape(n, width)
        return out

    audio = matrix("audio", np.float16)
    shape = [int(x) for x in (t.schema.metadata or {}).get(b"audio_shape", b"").decode().split(",") if x]
    audio_arr = None
    if audio.shape[1]:
        if int(np.prod(shape)) != audio.shape[1]:
            raise DataError(
                f"catalogue {path}: audio rows of {audio.shape[1]} values, metadata shape {shape}"
            )
        audio_arr = audio.reshape(n + 1, *shape)

    def column(name: str, pad: Any) -> np.ndarray:
        return np.r_[np.array([pad], dtype=object), t.column(name).to_numpy(zero_copy_only=False)]

    cat = Catalogue(
        track_id=column("track_id", ""),
        features=matrix("features", np.float32),
        acoustic=matrix("acoustic_vector", np.float32),
        audio=audio_arr,
        is_cold=column("is_cold", False).astype(bool),
        popularity=column("popularity", 0).astype(np.int64),
        listens=column("listens", 0).astype(np.int64),
        release_date=column("release_date", None),
    )
    _CATALOGUES[path] = (key, cat)
    return cat
