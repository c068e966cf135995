"""Listening sessions in the schema of Spotify's Music Streaming Sessions Dataset (MSSD): synthetic
generator, CSV importer, ranking examples, catalogue, readers.

Both sources produce session logs with the published columns (:data:`LOG_COLUMNS`) and track features
(:data:`TRACK_COLUMNS`); one code path turns the logs into examples. :func:`prepare` writes::

    root/manifest.json                 shards + meta (feature sizes, counts, split dates)
    root/tracks.parquet                the catalogue: index 1..N (0 = padding), standardised features,
                                       acoustic vector, audio (synthetic only), is_cold, popularity
    root/<split>/part-*.parquet        examples (:data:`SCHEMA`): one row = (query, candidate)

A query is a session position with at least one earlier event. Its real track is one row (label 1
when it was played: not ``skip_2``, the challenge target); sampled tracks from the catalogue released
by the session's date are more rows of the same query (label 0, ``is_negative``), contiguous, so in
val/test the rows of a ``query_id`` form a ranking list. Splits are by session date (train = first
~70% of days); cold tracks appear only after the train period. :func:`read_split` (Ray Data) and
:func:`iter_split_numpy` (pyarrow) decode rows through :func:`decode_batch`, which joins the catalogue.

- ``schema``: columns, features, stored rows, the time split (:func:`split_days`).
- ``settings``: :class:`RecsysSettings`, what ``prepare`` takes (from the recipe's data section).
- ``synthetic``: the hidden taste model and its logs; ``mssd``: the published CSV layout.
- ``events``: logs -> checked events and their features; ``examples``: events -> ranking rows.
- ``catalogue``: track features and ``tracks.parquet``; ``prepare``: the whole path.
- ``read``: shards -> decoded batches; ``query``: one served query -> model inputs.
"""

from .catalogue import Catalogue, load_catalogue, track_feature_matrix
from .mssd import check_columns, find_mssd_files, read_track_features, write_mssd_csv
from .prepare import prepare
from .query import encode_query
from .read import DECODE_ROWS, SHUFFLE_BUFFER_ROWS, decode_batch, iter_split_numpy, read_split
from .schema import (
    ACOUSTIC_DIM,
    BAD_ROW_POLICIES,
    CONTEXT_FEATURES,
    CONTEXT_TYPES,
    EVENT_FEATURES,
    LOG_COLUMNS,
    READ_COLUMNS,
    REASONS,
    SCHEMA,
    SOURCES,
    SPLITS,
    TASK,
    TRACK_COLUMNS,
    TRACK_FEATURES,
    TRACKS_FILE,
    TRACKS_SCHEMA,
    split_days,
)
from .settings import RecsysSettings
from .synthetic import SyntheticWorld, generate_logs, synthetic_audio, synthetic_world

__all__ = [
    "ACOUSTIC_DIM",
    "BAD_ROW_POLICIES",
    "CONTEXT_FEATURES",
    "CONTEXT_TYPES",
    "DECODE_ROWS",
    "EVENT_FEATURES",
    "LOG_COLUMNS",
    "READ_COLUMNS",
    "REASONS",
    "SCHEMA",
    "SHUFFLE_BUFFER_ROWS",
    "SOURCES",
    "SPLITS",
    "TASK",
    "TRACKS_FILE",
    "TRACKS_SCHEMA",
    "TRACK_COLUMNS",
    "TRACK_FEATURES",
    "Catalogue",
    "RecsysSettings",
    "SyntheticWorld",
    "check_columns",
    "decode_batch",
    "encode_query",
    "find_mssd_files",
    "generate_logs",
    "iter_split_numpy",
    "load_catalogue",
    "prepare",
    "read_split",
    "read_track_features",
    "split_days",
    "synthetic_audio",
    "synthetic_world",
    "track_feature_matrix",
    "write_mssd_csv",
]
