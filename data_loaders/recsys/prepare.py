"""``prepare``: synthetic or imported logs -> example shards + ``tracks.parquet`` + manifest.

Both sources meet in :func:`_build`: the catalogue arrays, the example rows of every log table
(:mod:`.events`, :mod:`.examples`), the catalogue file and the manifest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from ..shards import MANIFEST, ShardWriter, reusable, settings_of
from .catalogue import check_catalogue, standardise, track_feature_matrix, write_catalogue
from .events import parse_logs
from .examples import ExamplePlan, day_strings, new_counts, write_examples
from .mssd import LOG_TYPES, check_columns, find_mssd_files, read_csv, read_track_features
from .schema import (
    ACOUSTIC_DIM,
    CONTEXT_FEATURES,
    EVENT_FEATURES,
    LOG_COLUMNS,
    NUMERIC_TRACK,
    SCHEMA,
    SPLITS,
    TASK,
    TRACK_FEATURES,
    TRACKS_FILE,
    split_days,
)
from .settings import RecsysSettings
from .synthetic import generate_logs, synthetic_audio, synthetic_world


@overload
def prepare(settings: RecsysSettings, /) -> dict: ...
@overload
def prepare(*args: Any, **fields: Any) -> dict: ...
def prepare(*args: Any, **fields: Any) -> dict:
    """Write the recsys dataset to ``settings.root`` and return its manifest; an identical one is returned as is.

    ``source="synthetic"`` draws ``num_tracks`` tracks (with ``n_mels`` x ``frames`` audio) and
    ``num_sessions`` sessions of ``num_users`` hidden users over ``num_days`` days from ``start_date``;
    ``source="mssd"`` imports the CSVs under ``import_path`` (:func:`find_mssd_files`; the generator's
    size arguments are then unused). Splits are by session date (``split_days``). Every query gets
    ``negatives_per_event`` sampled negatives in train and ``eval_negatives`` in val/test.
    ``prepare("synthetic", root, ...)`` gives the fields of :class:`RecsysSettings` loose.
    """
    s = settings_of(RecsysSettings, args, fields)
    root, synthetic = str(s.root), s.source == "synthetic"
    if synthetic:
        import_path, import_files = None, []
    else:
        assert s.import_path is not None  # RecsysSettings requires it for source mssd
        import_path = os.path.abspath(s.import_path)
        log_paths, track_paths = find_mssd_files(import_path)
        # size + mtime, not sha256: the full MSSD is ~50 GB of CSV
        import_files = [
            [os.path.relpath(p, import_path), os.path.getsize(p), os.stat(p).st_mtime_ns]
            for p in track_paths + log_paths
        ]
    args_meta = {
        "source": s.source,
        "num_tracks": s.num_tracks if synthetic else None,
        "num_users": s.num_users if synthetic else None,
        "num_sessions": s.num_sessions if synthetic else None,
        "num_days": s.num_days if synthetic else None,
        "cold_fraction": s.cold_fraction if synthetic else None,
        "start_date": s.start_date if synthetic else None,
        "n_mels": s.n_mels if synthetic else None,
        "frames": s.frames if synthetic else None,
        "history_len": s.history_len,
        "negatives_per_event": s.negatives_per_event,
        "eval_negatives": s.eval_negatives,
        "val_fraction": s.val_fraction,
        "test_fraction": s.test_fraction,
        "seed": s.seed,
        "rows_per_shard": s.rows_per_shard,
        "import_path": import_path,
        "import_files": import_files,
        "on_bad_row": None if synthetic else s.on_bad_row,
    }
    existing = _existing(root, args_meta)
    if existing is not None:
        return existing
    if synthetic:
        return _build(root, args_meta, _synthetic_source(args_meta))
    return _build(root, args_meta, _mssd_source(root, args_meta, log_paths, track_paths))


@dataclass
class _Source:
    """What a source hands the common tail (:func:`_build`): catalogue rows, their days, the logs."""

    tracks: pa.Table  # catalogue rows in TRACK_COLUMNS; catalogue index = row + 1
    cold: np.ndarray  # bool [N]: first available after the train period
    avail: np.ndarray  # int64 [N] day offset from which a track can be sampled (-1: always)
    release: np.ndarray  # object [N] release date, None where unknown
    first_day: int  # days since 1970-01-01 of day offset 0
    num_days: int
    logs: Iterable[tuple[pa.Table, str]]  # (log table, where it came from), read once
    audio: Callable[[int, int], np.ndarray] | None = None  # catalogue rows lo:hi -> audio arrays
    audio_shape: list[int] | None = None
    import_stats: dict[str, int] = field(default_factory=dict)
    lookup: pa.Array | None = None  # the logs' track ids by lookup row, when not the catalogue's
    cat_rows: np.ndarray | None = None  # lookup rows that are catalogue rows


def _synthetic_source(args: dict) -> _Source:
    a = args
    world = synthetic_world(
        a["num_tracks"], a["seed"], a["num_days"], a["cold_fraction"], a["val_fraction"], a["test_fraction"],
        a["start_date"],
    )  # fmt: skip
    first_day = int(np.datetime64(a["start_date"], "D").astype(np.int64))
    release = np.array([None] * len(world.release_day), dtype=object)
    has = world.release_day >= 0
    release[has] = day_strings(first_day + world.release_day[has])

    def audio(lo: int, hi: int) -> np.ndarray:
        return synthetic_audio(world, a["n_mels"], a["frames"], a["seed"], lo, hi)

    logs = generate_logs(world, a["num_users"], a["num_sessions"], a["seed"])
    return _Source(
        world.tracks, world.cold, world.release_day, release, first_day, a["num_days"],
        ((t, "synthetic logs") for t in logs), audio, [a["n_mels"], a["frames"]],
    )  # fmt: skip


def _mssd_source(root: str, args: dict, log_paths: list[str], track_paths: list[str]) -> _Source:
    tracks, track_where = read_track_features(track_paths)
    for p in log_paths:  # all headers first: a misspelled column fails before any long read
        check_columns(p, LOG_COLUMNS, "session log")
    _, _, ok = track_feature_matrix(tracks)
    stats = {"skipped_rows": 0, "skipped_sessions": 0, "skipped_session_rows": 0, "skipped_tracks": 0}
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        if args["on_bad_row"] == "fail":
            line = i - track_where.index(track_where[i]) + 2
            raise DataError(
                f"{track_where[i]} line {line}: track {tracks.column('track_id')[i].as_py()!r} has an empty "
                "or invalid feature value (on_bad_row=skip drops such tracks)"
            )
        stats["skipped_tracks"] = int((~ok).sum())
        tracks = tracks.filter(pa.array(ok))
    lookup = pc.utf8_trim_whitespace(tracks.column("track_id")).combine_chunks()
    if pc.count_distinct(lookup).as_py() != len(lookup):
        raise DataError(f"track features in {', '.join(track_paths)} list a track_id more than once")

    # Pass 1: date range and the first day each track is seen (its availability; cold if after train).
    first_seen = np.full(len(lookup), np.iinfo(np.int64).max, dtype=np.int64)
    lo_day, hi_day = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for p in log_paths:
        parsed = parse_logs(read_csv(p, LOG_COLUMNS, LOG_TYPES), lookup, p, args["on_bad_row"], stats)
        if len(parsed.day):
            ev_day = np.repeat(parsed.day, np.diff(parsed.offsets))
            np.minimum.at(first_seen, parsed.track, ev_day)
            lo_day, hi_day = min(lo_day, int(parsed.day.min())), max(hi_day, int(parsed.day.max()))
    if lo_day > hi_day:
        raise DataError(f"no usable session rows in {', '.join(log_paths)}")
    num_days = hi_day - lo_day + 1
    train_end, _ = split_days(num_days, args["val_fraction"], args["test_fraction"])
    seen = first_seen <= hi_day
    stats["unused_tracks"] = int((~seen).sum())  # in the track features, never in the logs: left out
    cat_rows = np.flatnonzero(seen)
    avail = first_seen[cat_rows] - lo_day
    release = day_strings(first_seen[cat_rows])
    if any(stats[k] for k in ("skipped_rows", "skipped_tracks")):
        print(
            f"warning: skipped {stats['skipped_rows']} bad log row(s) ({stats['skipped_sessions']} whole "
            f"session(s), {stats['skipped_session_rows']} rows) and {stats['skipped_tracks']} bad track(s) "
            f"from {args['import_path']} (counts in {os.path.join(root, MANIFEST)} meta.import)",
            file=sys.stderr,
        )

    def logs() -> Iterator[tuple[pa.Table, str]]:
        for p in log_paths:
            yield read_csv(p, LOG_COLUMNS, LOG_TYPES), p

    return _Source(
        tracks.take(pa.array(cat_rows)), avail > train_end, avail, release, lo_day, num_days, logs(),
        import_stats=stats, lookup=lookup, cat_rows=cat_rows,
    )  # fmt: skip


def _build(root: str, args: dict, source: _Source) -> dict:
    """Common tail of both sources: catalogue arrays, examples, tracks.parquet, manifest."""
    tracks, cold, avail, first_day, num_days = (
        source.tracks, source.cold, source.avail, source.first_day, source.num_days
    )  # fmt: skip
    train_end, val_end = split_days(num_days, args["val_fraction"], args["test_fraction"])
    n = tracks.num_rows
    feats, acoustic, _ = track_feature_matrix(tracks)
    feats, mean, std = standardise(feats, ~cold)
    track_ids = pc.utf8_trim_whitespace(tracks.column("track_id")).to_numpy(zero_copy_only=False)
    lookup = source.lookup
    if lookup is None:  # the catalogue is the lookup
        lookup = pa.array(track_ids, type=pa.string())
        row_to_index = np.arange(1, n + 1, dtype=np.int64)
    else:
        row_to_index = np.zeros(len(lookup), dtype=np.int64)
        row_to_index[source.cat_rows] = np.arange(1, n + 1)
    order0 = np.argsort(avail, kind="stable")
    rank = np.zeros(n + 1, dtype=np.int64)
    rank[order0 + 1] = np.arange(n)
    plan = ExamplePlan(
        first_day=first_day,
        train_end=train_end,
        val_end=val_end,
        history_len=args["history_len"],
        negatives=(args["negatives_per_event"], args["eval_negatives"], args["eval_negatives"]),
        is_cold=np.r_[False, cold],
        order=order0 + 1,
        rank=rank,
        sorted_avail=np.asarray(avail)[order0],
        row_to_index=row_to_index,
    )
    counts = new_counts()
    popularity = np.zeros(n + 1, dtype=np.int64)
    listens = np.zeros(n + 1, dtype=np.int64)
    rng = np.random.default_rng([args["seed"], 5])
    with ShardWriter(root, TASK, SCHEMA, args["rows_per_shard"], SPLITS) as writer:
        for table, where in source.logs:
            parsed = parse_logs(table, lookup, where, args["on_bad_row"] or "fail", None)
            write_examples(writer, parsed, plan, rng, counts, popularity, listens)
        tracks_path = os.path.join(root, TRACKS_FILE)
        write_catalogue(
            tracks_path, track_ids, feats, acoustic, source.audio, source.audio_shape, cold, source.release,
            popularity[1:], listens[1:],
        )  # fmt: skip
        bounds = np.array([0, train_end, train_end + 1, val_end, val_end + 1, num_days - 1])
        d = day_strings(first_day + bounds).tolist()
        meta = {
            "args": args,
            "num_tracks": n + 1,
            "catalogue_tracks": n,
            "cold_tracks": int(cold.sum()),
            "history_len": args["history_len"],
            "event_features": len(EVENT_FEATURES),
            "event_feature_names": list(EVENT_FEATURES),
            "context_features": len(CONTEXT_FEATURES),
            "context_feature_names": list(CONTEXT_FEATURES),
            "track_features": len(TRACK_FEATURES),
            "track_feature_names": list(TRACK_FEATURES),
            "track_feature_stats": {"columns": list(NUMERIC_TRACK), "mean": mean, "std": std},
            "acoustic_dim": ACOUSTIC_DIM,
            "has_audio": source.audio is not None,
            "audio_shape": source.audio_shape,
            "list_size": {s: 1 + plan.negatives[i] for i, s in enumerate(SPLITS)},
            "split_dates": {"train": d[0:2], "val": d[2:4], "test": d[4:6]},
            "label": "1 = played (not skip_2); 0 = skipped (skip_2) or a sampled negative",
            "counts": counts,
            "tracks_file": TRACKS_FILE,
            "tracks_rows": n,
            "import": source.import_stats,
        }
        return writer.close(meta)


def _existing(root: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if it was prepared with ``args``; None if there is none or it differs.

    Missing or damaged shards (or catalogue) of a matching dataset are an error naming the file.
    """
    manifest = reusable(root, TASK, lambda meta: meta.get("args") == args)
    if manifest is not None:
        check_catalogue(root, manifest["meta"])
    return manifest
