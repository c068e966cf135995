"""The published MSSD CSV layout: the importer's file discovery and checked reads, and a writer of
synthetic data in that layout (:func:`write_mssd_csv`, for tests and demos)."""

from __future__ import annotations

import csv
import difflib
import glob
import gzip
import os
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.csv as pa_csv

from ..errors import DataError, one_line
from .schema import FLAG_COLUMNS, INT_COLUMNS, LOG_COLUMNS, TRACK_COLUMNS
from .synthetic import generate_logs, synthetic_world


def write_mssd_csv(
    out_dir: str,
    num_tracks: int = 400,
    num_users: int = 60,
    num_sessions: int = 400,
    seed: int = 0,
    num_days: int = 60,
    cold_fraction: float = 0.1,
    log_files: int = 2,
) -> dict[str, list[str]]:
    """Write a small synthetic dataset in the published CSV layout, for the importer.

    ``out_dir/track_features/tf_000000000000.csv`` and ``out_dir/training_set/log_<i>_<date>_000000000000.csv``
    (booleans as ``true``/``false``, no quoting), as in the MSSD download. Returns the paths by kind.
    """
    world = synthetic_world(num_tracks, seed, num_days, cold_fraction)
    tf_dir, log_dir = os.path.join(out_dir, "track_features"), os.path.join(out_dir, "training_set")
    os.makedirs(tf_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    tf_path = os.path.join(tf_dir, "tf_000000000000.csv")
    _write_plain_csv(world.tracks, tf_path)
    per_file = -(-num_sessions // max(1, log_files))
    logs = []
    for i, table in enumerate(generate_logs(world, num_users, num_sessions, seed, chunk_sessions=per_file)):
        path = os.path.join(log_dir, f"log_{i}_{world.start_date.replace('-', '')}_000000000000.csv")
        _write_plain_csv(table, path)
        logs.append(path)
    return {"track_features": [tf_path], "logs": logs}


def _write_plain_csv(table: pa.Table, path: str) -> None:
    """CSV as published: a bare header line (pyarrow would quote it), unquoted values."""
    with open(path, "wb") as f:
        f.write((",".join(table.column_names) + "\n").encode())
        pa_csv.write_csv(
            table, f, write_options=pa_csv.WriteOptions(include_header=False, quoting_style="none")
        )


def find_mssd_files(path: str) -> tuple[list[str], list[str]]:
    """(session-log CSVs, track-feature CSVs) under an MSSD folder.

    Track features: ``track_features/*.csv`` or top-level ``tf_*.csv`` / ``track_features*.csv``.
    Session logs: ``training_set/*.csv`` and every other top-level ``*.csv`` (``.csv.gz`` too).
    The challenge's ``test_set`` (logs without skip labels) is not read.
    """
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"data path is not a folder: {path}")

    def csvs(folder: str) -> list[str]:
        return sorted(p for ext in ("*.csv", "*.csv.gz") for p in glob.glob(os.path.join(folder, ext)))

    tracks = csvs(os.path.join(path, "track_features"))
    logs = csvs(os.path.join(path, "training_set"))
    for p in csvs(path):
        name = os.path.basename(p)
        (tracks if name.startswith(("tf_", "track_features")) else logs).append(p)
    if not tracks:
        raise DataError(f"no track features CSV in {path}: expected track_features/*.csv or tf_*.csv")
    if not logs:
        raise DataError(f"no session log CSV in {path}: expected training_set/*.csv or log_*.csv")
    return logs, tracks


def _header(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"unreadable CSV {path}: {one_line(err)}") from None


def check_columns(path: str, expected: Iterable[str], kind: str) -> None:
    """DataError naming ``path`` and each missing column, with a close match from the file if any."""
    found = _header(path)
    missing = [c for c in expected if c not in found]
    if not missing:
        return
    extra = [c for c in found if c not in expected]
    parts = []
    for col in missing:
        near = difflib.get_close_matches(col, extra, n=1, cutoff=0.6)
        parts.append(f"{col} (the file has {near[0]!r}: misspelled?)" if near else col)
    raise DataError(f"{path} lacks MSSD {kind} column(s): {', '.join(parts)}")


def read_csv(path: str, columns: Iterable[str], types: dict[str, pa.DataType]) -> pa.Table:
    columns = list(columns)
    opts = pa_csv.ConvertOptions(
        column_types={c: t for c, t in types.items() if c in columns},
        include_columns=columns,
        strings_can_be_null=False,
    )
    try:
        return pa_csv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"bad CSV {path}: {one_line(err)}") from None


LOG_TYPES = {
    **{c: pa.string() for c in LOG_COLUMNS},
    **{c: pa.bool_() for c in FLAG_COLUMNS},  # pyarrow reads true/false and 1/0
    **{c: pa.int64() for c in INT_COLUMNS},
}
_TRACK_TYPES = {
    **{c: pa.float64() for c in TRACK_COLUMNS},
    "track_id": pa.string(),
    "mode": pa.string(),
}


def read_track_features(paths: list[str]) -> tuple[pa.Table, list[str]]:
    """All track-feature rows of ``paths`` (columns checked) and, per row, the file it came from."""
    tables, where = [], []
    for p in paths:
        check_columns(p, TRACK_COLUMNS, "track features")
        t = read_csv(p, TRACK_COLUMNS, _TRACK_TYPES)
        tables.append(t.select(list(TRACK_COLUMNS)))
        where += [p] * t.num_rows
    return pa.concat_tables(tables), where
