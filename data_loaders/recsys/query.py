"""Serving: one listening query -> model inputs, through the functions that wrote the training rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError
from .catalogue import Catalogue
from .events import context_features, event_features
from .read import candidate_inputs
from .schema import CONTEXT_TYPES, EVENT_FEATURES, REASONS


def _code(value: str, names: Sequence[str], field: str) -> int:
    if value not in names:
        raise DataError(f"{field} '{value}' is not one of {', '.join(names)}")
    return names.index(value)


def encode_query(
    cat: Catalogue,
    history: Sequence[dict[str, Any]],
    context: dict[str, Any],
    candidates: Sequence[str],
    history_len: int,
) -> dict[str, np.ndarray]:
    """One listening query at serving time -> model inputs, one row per candidate (keys as
    :func:`decode_batch`, without labels).

    ``history``: the session's past events, oldest first, as MSSD log fields (``track_id``,
    ``skip_1``..``skip_3``, ``not_skipped``, ``context_switch``, the pause flags,
    ``hist_user_behavior_n_seekfwd``/``_n_seekback``/``_is_shuffle``/``_reason_end``);
    ``context``: what is known before the candidate plays (``date``, ``hour_of_day``, ``premium``,
    ``context_type``, ``hist_user_behavior_reason_start``, ``session_position``,
    ``session_length``, ...). The features come from the same functions that wrote the training
    rows, so a served query is encoded exactly as in training. Unknown ids raise DataError.
    """
    H = int(history_len)
    past = list(history)[-H:]  # the model sees the last H events, as in training
    tracks = cat.lookup([e["track_id"] for e in past], "history")
    cand = cat.lookup(list(candidates), "candidates")
    B, E = len(cand), len(past)
    events = {k: np.asarray([e[k] for e in past]) for k in past[0] if k != "track_id"} if past else {}
    if past:
        events["hist_user_behavior_reason_end"] = np.asarray(
            [_code(e["hist_user_behavior_reason_end"], REASONS, "reason_end") for e in past]
        )
        ev = event_features(events)
    else:
        ev = np.zeros((0, len(EVENT_FEATURES)), dtype=np.float32)
    c = {k: np.asarray([v]) for k, v in context.items() if k != "date"}
    c["context_type"] = np.asarray([_code(context["context_type"], CONTEXT_TYPES, "context_type")])
    c["hist_user_behavior_reason_start"] = np.asarray(
        [_code(context["hist_user_behavior_reason_start"], REASONS, "reason_start")]
    )
    day = np.asarray([np.datetime64(context["date"], "D").astype(np.int64)])
    ctx = context_features(c, day)
    hist = np.zeros((B, H), dtype=np.int64)
    hist_f = np.zeros((B, H, ev.shape[1]), dtype=np.float32)
    mask = np.zeros((B, H), dtype=bool)
    if E:  # left padding; the most recent event sits at H - 1
        hist[:, H - E :], hist_f[:, H - E :], mask[:, H - E :] = tracks, ev, True
    return {
        "history_tracks": hist,
        "history_features": hist_f,
        "history_mask": mask,
        **candidate_inputs(cat, cand),
        "context": np.repeat(ctx, B, axis=0),
        "is_cold": cat.is_cold[cand],
    }
