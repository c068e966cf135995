"""What a recsys dataset is: the published MSSD columns, the features derived from them, the stored
example rows (:data:`SCHEMA`) and catalogue rows (:data:`TRACKS_SCHEMA`), and the time split."""

from __future__ import annotations

import pyarrow as pa

from ..errors import DataError
from ..shards import check_fractions

TASK = "recsys"
SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "mssd")
BAD_ROW_POLICIES = ("skip", "fail")
TRACKS_FILE = "tracks.parquet"

# The published MSSD session-log columns, in file order (training_set/log_*.csv).
LOG_COLUMNS = (
    "session_id", "session_position", "session_length", "track_id_clean",
    "skip_1", "skip_2", "skip_3", "not_skipped", "context_switch",
    "no_pause_before_play", "short_pause_before_play", "long_pause_before_play",
    "hist_user_behavior_n_seekfwd", "hist_user_behavior_n_seekback", "hist_user_behavior_is_shuffle",
    "hour_of_day", "date", "premium", "context_type",
    "hist_user_behavior_reason_start", "hist_user_behavior_reason_end",
)  # fmt: skip
ACOUSTIC_DIM = 8
# The published MSSD track-feature columns, in file order (track_features/tf_*.csv).
TRACK_COLUMNS = (
    "track_id", "duration", "release_year", "us_popularity_estimate", "acousticness", "beat_strength",
    "bounciness", "danceability", "dyn_range_mean", "energy", "flatness", "instrumentalness", "key",
    "liveness", "loudness", "mechanism", "mode", "organism", "speechiness", "tempo", "time_signature",
    "valence", *(f"acoustic_vector_{i}" for i in range(ACOUSTIC_DIM)),
)  # fmt: skip
CONTEXT_TYPES = (
    "editorial_playlist", "user_collection", "catalog", "radio", "charts", "personalized_playlist",
)  # fmt: skip
REASONS = (
    "trackdone", "fwdbtn", "backbtn", "clickrow", "playbtn", "appload", "remote", "endplay", "logout",
    "uriopen", "popup", "clickside", "trackerror",
)  # fmt: skip
FLAG_COLUMNS = (
    "skip_1", "skip_2", "skip_3", "not_skipped", "context_switch", "no_pause_before_play",
    "short_pause_before_play", "long_pause_before_play", "hist_user_behavior_is_shuffle", "premium",
)  # fmt: skip
INT_COLUMNS = (
    "session_position", "session_length", "hist_user_behavior_n_seekfwd", "hist_user_behavior_n_seekback",
    "hour_of_day",
)  # fmt: skip

# Per history event (history_features is [len, F_event] flattened): what happened to that track.
EVENT_FEATURES = (
    "skip_1", "skip_2", "skip_3", "not_skipped", "context_switch", "no_pause_before_play",
    "short_pause_before_play", "long_pause_before_play", "log1p_n_seekfwd", "log1p_n_seekback",
    "is_shuffle", *(f"reason_end_{r}" for r in REASONS),
)  # fmt: skip
# Per query: only what is known before the candidate plays (never its skips, seeks or reason_end).
CONTEXT_FEATURES = (
    "hour_sin", "hour_cos", "weekday_sin", "weekday_cos", "premium", "is_shuffle", "context_switch",
    "no_pause_before_play", "short_pause_before_play", "long_pause_before_play",
    *(f"context_type_{c}" for c in CONTEXT_TYPES), *(f"reason_start_{r}" for r in REASONS),
    "position_over_20", "length_over_20", "position_fraction",
)  # fmt: skip
# Catalogue features: numeric ones z-scored with statistics of the warm (non-cold) tracks.
NUMERIC_TRACK = (
    "duration", "release_year", "us_popularity_estimate", "acousticness", "beat_strength", "bounciness",
    "danceability", "dyn_range_mean", "energy", "flatness", "instrumentalness", "liveness", "loudness",
    "mechanism", "organism", "speechiness", "tempo", "valence",
)  # fmt: skip
TRACK_FEATURES = (
    *("log_duration" if c == "duration" else c for c in NUMERIC_TRACK),
    "key_sin", "key_cos", "mode_major", "time_signature_3", "time_signature_4", "time_signature_5",
)  # fmt: skip

SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),  # "<session_id>:<session_position>"
        ("session_id", pa.string()),
        ("date", pa.string()),  # the session's date, YYYY-MM-DD
        ("history_tracks", pa.list_(pa.int32())),  # catalogue indices, oldest first, <= history_len
        ("history_features", pa.list_(pa.float32())),  # [len(history_tracks), F_event] flattened
        ("candidate", pa.int32()),  # catalogue index
        ("context", pa.list_(pa.float32())),  # [F_ctx]
        ("label", pa.float32()),  # 1 = played (not skip_2); 0 = skipped or a sampled negative
        ("is_negative", pa.bool_()),
        ("is_cold", pa.bool_()),  # the candidate never appears in the train period
    ]
)
TRACKS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("index", pa.int32()),  # 1..N, the value in candidate / history_tracks
        ("features", pa.list_(pa.float32())),  # [F_track], see meta track_feature_names
        ("acoustic_vector", pa.list_(pa.float32())),  # [8], as published
        ("audio", pa.list_(pa.float16())),  # [n_mels, frames] flattened; empty when has_audio is false
        ("is_cold", pa.bool_()),
        # synthetic: release day inside the window (null: back catalogue); mssd: first day in the logs
        ("release_date", pa.string()),
        ("popularity", pa.int64()),  # train-split plays (label 1), for the popularity baseline
        ("listens", pa.int64()),  # train-split events, skipped or not
    ]
)


# The stored columns decode_batch reads (session_id and date stay on disk).
READ_COLUMNS = [
    "query_id",
    "history_tracks",
    "history_features",
    "candidate",
    "context",
    "label",
    "is_negative",
    "is_cold",
]


def split_days(num_days: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(last train day, last val day) as offsets from the first day; the test split has the rest.

    60 days at 0.15/0.15 give train days 0-41, val 42-50, test 51-59.
    """
    check_fractions(val_fraction, test_fraction, positive=True)
    n_val = max(1, round(val_fraction * num_days))
    n_test = max(1, round(test_fraction * num_days))
    n_train = num_days - n_val - n_test
    if n_train < 1:
        raise DataError(f"the logs span {num_days} day(s): a time split needs at least 3")
    return n_train - 1, n_train + n_val - 1
