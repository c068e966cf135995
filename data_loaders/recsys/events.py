"""Session logs -> events: checked, cleaned and sorted logs (:func:`parse_logs`, both sources), and the
per-event and per-query features the examples and served queries share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .schema import CONTEXT_TYPES, EVENT_FEATURES, FLAG_COLUMNS, INT_COLUMNS, LOG_COLUMNS, REASONS


@dataclass
class ParsedLogs:
    """One log table's valid rows, sorted by session (file order) then position."""

    session_id: np.ndarray  # object [S]
    offsets: np.ndarray  # int64 [S + 1]
    day: np.ndarray  # int64 [S] days since 1970-01-01 (date of the session's first event)
    track: np.ndarray  # int64 [E] catalogue row (0-based into the lookup)
    cols: dict[str, np.ndarray]  # the other LOG_COLUMNS as numpy, [E]


def _valid(col: pa.ChunkedArray) -> np.ndarray:
    return pc.is_valid(col).to_numpy(zero_copy_only=False)


def _filled(col: pa.ChunkedArray | pa.Array, fill: Any) -> np.ndarray:
    return pc.fill_null(col, fill).to_numpy(zero_copy_only=False)


def parse_logs(
    table: pa.Table, lookup: pa.Array, where: str, on_bad_row: str, stats: dict[str, int] | None
) -> ParsedLogs:
    """Check, clean and sort one log table; ``lookup`` holds the known track ids (row = position).

    A row with an empty value, a date that is not YYYY-MM-DD, an hour outside 0-23, a position
    outside 1..session_length or a track id missing from the track features is bad: DataError
    naming the file and line (``fail``) or its whole session is dropped (``skip``, counted in ``stats``).
    """
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    reason = np.empty(n, dtype=object)

    def flag(mask: np.ndarray, why: str) -> None:
        new = mask & ~bad
        reason[new] = why
        bad[new] = True

    for name in LOG_COLUMNS:
        col = table.column(name)
        ok = _valid(col)
        if pa.types.is_string(col.type):
            ok &= pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0).to_numpy(zero_copy_only=False)
        flag(~ok, f"empty value in column {name}")
    track_col = pc.utf8_trim_whitespace(table.column("track_id_clean"))
    row = pc.index_in(track_col, value_set=lookup)
    flag(~_valid(row), "unknown track id (not in the track features)")
    days = pc.cast(
        pc.strptime(table.column("date"), format="%Y-%m-%d", unit="s", error_is_null=True), pa.date32()
    )
    flag(~_valid(days), "date is not YYYY-MM-DD")
    ints = {c: _filled(table.column(c), 0).astype(np.int64) for c in INT_COLUMNS}
    flag((ints["hour_of_day"] < 0) | (ints["hour_of_day"] > 23), "hour_of_day outside 0-23")
    pos, length = ints["session_position"], ints["session_length"]
    flag((pos < 1) | (pos > length), "session_position outside 1..session_length")

    sid_codes = pc.dictionary_encode(table.column("session_id")).combine_chunks()
    codes = sid_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if on_bad_row == "fail":
            value = table.column("track_id_clean")[i].as_py() if reason[i].startswith("unknown") else None
            shown = f" {value!r}" if value is not None else ""
            raise DataError(f"{where} line {i + 2}: {reason[i]}{shown} (on_bad_row=skip drops such sessions)")
        keep = ~np.isin(codes, np.unique(codes[bad]))
        if stats is not None:
            stats["skipped_rows"] += int(bad.sum())
            stats["skipped_sessions"] += len(np.unique(codes[bad]))
            stats["skipped_session_rows"] += int((~keep).sum())
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((pos[idx], codes[idx]))]  # sessions in file order, events by position
    codes_s = codes[idx]
    starts = np.flatnonzero(np.r_[True, codes_s[1:] != codes_s[:-1]]) if len(idx) else np.zeros(0, int)
    offsets = np.r_[starts, len(idx)].astype(np.int64)
    day_all = _filled(pc.cast(days, pa.int32()), 0).astype(np.int64)
    cols: dict[str, np.ndarray] = {c: v[idx] for c, v in ints.items()}
    for c in FLAG_COLUMNS:
        cols[c] = _filled(pc.cast(table.column(c), pa.bool_()), False)[idx]
    for c, vocab in (
        ("context_type", CONTEXT_TYPES),
        ("hist_user_behavior_reason_start", REASONS),
        ("hist_user_behavior_reason_end", REASONS),
    ):  # unknown values are not errors: they encode as all-zero one-hots
        code = pc.index_in(pc.utf8_trim_whitespace(table.column(c)), value_set=pa.array(vocab))
        cols[c] = _filled(code, -1).astype(np.int64)[idx]
    sids = table.column("session_id").to_numpy(zero_copy_only=False)[idx]
    return ParsedLogs(
        session_id=sids[starts],
        offsets=offsets,
        day=day_all[idx][starts],
        track=_filled(row, 0).astype(np.int64)[idx],
        cols=cols,
    )


def _one_hot(code: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(code), k), dtype=np.float32)
    ok = code >= 0
    out[np.flatnonzero(ok), code[ok]] = 1
    return out


def event_features(c: dict[str, np.ndarray]) -> np.ndarray:
    """[E, F_event] float32 in EVENT_FEATURES order."""
    f = [c[k].astype(np.float32)[:, None] for k in EVENT_FEATURES[:8]]
    f.append(np.log1p(c["hist_user_behavior_n_seekfwd"].clip(0)).astype(np.float32)[:, None])
    f.append(np.log1p(c["hist_user_behavior_n_seekback"].clip(0)).astype(np.float32)[:, None])
    f.append(c["hist_user_behavior_is_shuffle"].astype(np.float32)[:, None])
    f.append(_one_hot(c["hist_user_behavior_reason_end"], len(REASONS)))
    return np.ascontiguousarray(np.concatenate(f, axis=1), dtype=np.float32)


def context_features(c: dict[str, np.ndarray], day: np.ndarray) -> np.ndarray:
    """[E, F_ctx] float32 in CONTEXT_FEATURES order; ``day`` per event (days since 1970-01-01)."""
    hour = c["hour_of_day"] * (2 * math.pi / 24)
    weekday = ((day + 3) % 7) * (2 * math.pi / 7)  # 1970-01-01 was a Thursday; Monday = 0
    pos, length = c["session_position"].astype(np.float32), c["session_length"].astype(np.float32)
    f = [np.stack([np.sin(hour), np.cos(hour), np.sin(weekday), np.cos(weekday)], 1).astype(np.float32)]
    f += [
        c[k].astype(np.float32)[:, None]
        for k in ("premium", "hist_user_behavior_is_shuffle", "context_switch", "no_pause_before_play")
    ]
    f += [c[k].astype(np.float32)[:, None] for k in ("short_pause_before_play", "long_pause_before_play")]
    f.append(_one_hot(c["context_type"], len(CONTEXT_TYPES)))
    f.append(_one_hot(c["hist_user_behavior_reason_start"], len(REASONS)))
    f.append(np.stack([(pos - 1) / 20, length / 20, (pos - 1) / np.maximum(length - 1, 1)], 1))
    return np.ascontiguousarray(np.concatenate(f, axis=1), dtype=np.float32)
