"""Events -> example rows: per query its real row and sampled negatives, contiguous (a ranking list)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..shards import ShardWriter
from .events import ParsedLogs, context_features, event_features
from .schema import SPLITS


@dataclass
class ExamplePlan:
    """What the example writer needs besides the events."""

    first_day: int  # days since 1970-01-01 of day offset 0
    train_end: int  # last train day offset
    val_end: int  # last val day offset
    history_len: int
    negatives: tuple[int, int, int]  # per split
    is_cold: np.ndarray  # bool [N + 1] by catalogue index
    order: np.ndarray  # int64 [N] catalogue indices sorted by availability day
    rank: np.ndarray  # int64 [N + 1] position of a catalogue index in ``order``
    sorted_avail: np.ndarray  # int64 [N] availability day offset in ``order`` (-1: always)
    row_to_index: np.ndarray  # int64 [rows of the lookup] catalogue index (0: not in the catalogue)


def new_counts() -> dict[str, dict[str, int]]:
    keys = ("sessions", "events", "queries", "rows", "positives", "cold_rows", "cold_queries")
    return {s: dict.fromkeys((*keys, "cold_positives"), 0) for s in SPLITS}


def write_examples(
    writer: ShardWriter,
    parsed: ParsedLogs,
    plan: ExamplePlan,
    rng: np.random.Generator,
    counts: dict[str, dict[str, int]],
    popularity: np.ndarray,
    listens: np.ndarray,
    chunk_events: int = 1 << 16,
) -> None:
    """Turn one parsed log table into example rows, ``chunk_events`` events at a time."""
    S = len(parsed.session_id)
    s0 = 0
    while s0 < S:
        # whole sessions per chunk, at least one
        s1 = max(s0 + 1, int(np.searchsorted(parsed.offsets, parsed.offsets[s0] + chunk_events, "right")) - 1)
        s1 = min(s1, S)
        _write_chunk(writer, parsed, s0, s1, plan, rng, counts, popularity, listens)
        s0 = s1


def _write_chunk(
    writer: ShardWriter,
    parsed: ParsedLogs,
    s0: int,
    s1: int,
    plan: ExamplePlan,
    rng: np.random.Generator,
    counts: dict[str, dict[str, int]],
    popularity: np.ndarray,
    listens: np.ndarray,
) -> None:
    """Rows of sessions ``s0:s1``: per query its real row and negatives, contiguous, real at a random slot."""
    e0, e1 = int(parsed.offsets[s0]), int(parsed.offsets[s1])
    offsets = parsed.offsets[s0 : s1 + 1] - e0
    c = {k: v[e0:e1] for k, v in parsed.cols.items()}
    lengths = np.diff(offsets)
    sess_of = np.repeat(np.arange(s1 - s0), lengths)
    day = parsed.day[s0:s1]
    off = day - plan.first_day
    split_of = np.where(off <= plan.train_end, 0, np.where(off <= plan.val_end, 1, 2))  # [S]
    track = plan.row_to_index[parsed.track[e0:e1]]  # [E] catalogue indices
    track32 = track.astype(np.int32)
    ev = event_features(c)
    ctx = context_features(c, day[sess_of])
    label = (~c["skip_2"]).astype(np.float32)
    within = np.arange(e1 - e0) - offsets[sess_of]
    in_train = split_of[sess_of] == 0
    np.add.at(listens, track[in_train], 1)
    np.add.at(popularity, track[in_train & (label > 0)], 1)
    for s in range(3):
        cnt = counts[SPLITS[s]]
        cnt["sessions"] += int((split_of == s).sum())
        cnt["events"] += int((split_of[sess_of] == s).sum())

    queries = np.flatnonzero(within >= 1)
    q_split = split_of[sess_of[queries]]
    n_neg = np.asarray(plan.negatives)[q_split]
    max_neg = int(n_neg.max()) if len(queries) else 0
    # Negatives: uniform over the catalogue available on the session's day, never the real track.
    n_avail = np.searchsorted(plan.sorted_avail, off[sess_of[queries]], side="right")
    if max_neg and (n_avail < 2).any():
        raise DataError(
            "the catalogue is too small to sample negatives (fewer than 2 tracks available on a day)"
        )
    j = np.floor(rng.random((len(queries), max_neg)) * (n_avail - 1)[:, None]).astype(np.int64)
    j += j >= plan.rank[track[queries]][:, None]
    negs = plan.order[np.minimum(j, len(plan.order) - 1)]
    slots = np.floor(rng.random(len(queries)) * (n_neg + 1)).astype(np.int64)  # where the real row goes

    for s in range(3):
        sel = q_split == s
        cnt = counts[SPLITS[s]]
        real_cold = plan.is_cold[track[queries[sel]]]
        cnt["queries"] += int(sel.sum())
        cnt["rows"] += int(sel.sum() * (1 + plan.negatives[s]))
        cnt["positives"] += int(label[queries[sel]].sum())
        cnt["cold_queries"] += int(real_cold.sum())
        cnt["cold_positives"] += int((real_cold & (label[queries[sel]] > 0)).sum())
        cnt["cold_rows"] += int(real_cold.sum() + plan.is_cold[negs[sel, : plan.negatives[s]]].sum())

    sids, dates = parsed.session_id[s0:s1], day_strings(day)
    pos = c["session_position"]
    H = plan.history_len
    is_cold = plan.is_cold
    for qi, e in enumerate(queries.tolist()):
        s = int(sess_of[e])
        lo = max(int(offsets[s]), e - H)
        split = SPLITS[q_split[qi]]
        base = {
            "query_id": f"{sids[s]}:{pos[e]}",
            "session_id": sids[s],
            "date": dates[s],
            "history_tracks": track32[lo:e],
            "history_features": ev[lo:e].reshape(-1),
            "context": ctx[e],
        }
        k, slot = 0, int(slots[qi])
        for r in range(int(n_neg[qi]) + 1):
            if r == slot:
                cand, lab, neg = int(track[e]), float(label[e]), False
            else:
                cand, lab, neg = int(negs[qi, k]), 0.0, True
                k += 1
            writer.add(
                split,
                {**base, "candidate": cand, "label": lab, "is_negative": neg, "is_cold": bool(is_cold[cand])},
            )


def day_strings(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype="datetime64[D]").astype(str).astype(object)
