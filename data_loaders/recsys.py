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
"""

from __future__ import annotations

import csv
import datetime as _dt
import difflib
import functools
import glob
import gzip
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .errors import DataError
from .shards import ShardWriter, iter_tables, load_manifest, readable_paths, reusable

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data

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
_FLAG_COLUMNS = (
    "skip_1", "skip_2", "skip_3", "not_skipped", "context_switch", "no_pause_before_play",
    "short_pause_before_play", "long_pause_before_play", "hist_user_behavior_is_shuffle", "premium",
)  # fmt: skip
_INT_COLUMNS = (
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
_NUMERIC_TRACK = (
    "duration", "release_year", "us_popularity_estimate", "acousticness", "beat_strength", "bounciness",
    "danceability", "dyn_range_mean", "energy", "flatness", "instrumentalness", "liveness", "loudness",
    "mechanism", "organism", "speechiness", "tempo", "valence",
)  # fmt: skip
TRACK_FEATURES = (
    *("log_duration" if c == "duration" else c for c in _NUMERIC_TRACK),
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


# ---------------------------------------------------------------------------------------------
# Time split
# ---------------------------------------------------------------------------------------------


def split_days(num_days: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(last train day, last val day) as offsets from the first day; the test split has the rest.

    60 days at 0.15/0.15 give train days 0-41, val 42-50, test 51-59.
    """
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be > 0 "
            "and leave days for training (sum < 1)"
        )
    n_val = max(1, round(val_fraction * num_days))
    n_test = max(1, round(test_fraction * num_days))
    n_train = num_days - n_val - n_test
    if n_train < 1:
        raise DataError(f"the logs span {num_days} day(s): a time split needs at least 3")
    return n_train - 1, n_train + n_val - 1


# ---------------------------------------------------------------------------------------------
# Synthetic world: a hidden taste model behind MSSD-shaped logs
# ---------------------------------------------------------------------------------------------

_DIM = 8  # latent taste dimensions
_POOL = 64  # popularity-drawn candidates a session picks its tracks from, by taste
_MIN_LEN, _MAX_LEN = 10, 20  # MSSD session lengths
_FRESH_FRACTION = 0.05  # tracks released during the train period (warm: they do appear in train)
_COLD_EXPOSURE = 0.2  # share of popularity weight that new releases get once out (label-free promotion)
_CONTEXT_EFFECT = np.array([0.0, 0.9, 0.4, -0.4, -0.2, 0.3])  # by CONTEXT_TYPES: own collection skips least
_BIAS = -1.9  # tuned so about half of the events are played, as in MSSD (skip_2 ~ 50%)


@dataclass
class SyntheticWorld:
    """Hidden state of the generator plus the public track table. Row ``i`` is catalogue index ``i + 1``.

    The skip rule (per event, :func:`generate_logs`): ``P(played) = sigmoid(scale * <taste + drift, z>
    / sqrt(8) + appeal + 0.9 * cos(2 pi (hour - 15) / 24) * (2 energy - 1) + context_type + free-tier
    bonus + 0.25 * popularity - 0.3 shuffle + session mood - 0.04 position + bias)``, where ``z`` is the
    track latent, ``appeal = 1.2 <mu, z>`` is liked by everyone, and scale is 1.6 for premium users,
    1.2 for free ones. The track features, acoustic vector and audio are noisy functions of ``z``.
    """

    latent: np.ndarray  # float32 [N, 8]
    appeal: np.ndarray  # float32 [N]
    pop_z: np.ndarray  # float32 [N] standardised log popularity
    energy_c: np.ndarray  # float32 [N] 2 * energy - 1
    beat: np.ndarray  # float32 [N] rhythm strength in [0, 1] (audio)
    tempo: np.ndarray  # float32 [N] beats per minute (audio)
    release_day: np.ndarray  # int64 [N] day offset of release; -1: back catalogue
    cold: np.ndarray  # bool [N] released after the train period
    order: np.ndarray  # int64 [N] rows sorted by release day
    sorted_release: np.ndarray  # int64 [N] release_day[order]
    cum_weight: np.ndarray  # float64 [N] cumulative exposure weight in release order
    track_ids: np.ndarray  # object [N]
    tracks: pa.Table  # TRACK_COLUMNS
    start_date: str
    num_days: int


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _uuids(rng: np.random.Generator, n: int, prefix: str) -> np.ndarray:
    raw = rng.bytes(16 * n).hex()
    out = np.empty(n, dtype=object)
    for i in range(n):
        h = raw[32 * i : 32 * i + 32]
        out[i] = f"{prefix}{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return out


def synthetic_world(
    num_tracks: int,
    seed: int,
    num_days: int = 60,
    cold_fraction: float = 0.1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    start_date: str = "2018-07-15",
) -> SyntheticWorld:
    """Draw the catalogue: latents, popularity, release days and the public track-feature table.

    ``cold_fraction`` of the tracks are released after the train period (within the first days of
    val, so they are around for most of val and test); 5% more are released during train.
    """
    if num_tracks < 10:
        raise DataError(f"num_tracks must be >= 10, got {num_tracks}")
    if not 0 <= cold_fraction < 1:
        raise DataError(f"cold_fraction must be in [0, 1), got {cold_fraction}")
    train_end, _ = split_days(num_days, val_fraction, test_fraction)
    rng = np.random.default_rng([seed, 1])
    n, d = num_tracks, _DIM
    z = rng.standard_normal((n, d)).astype(np.float32)
    mu = rng.standard_normal(d)
    mu /= np.linalg.norm(mu)
    appeal = (1.2 * z @ mu).astype(np.float32)
    log_w = 1.1 * rng.standard_normal(n) + 0.3 * appeal  # Zipf-like exposure, a little tied to appeal
    pop_z = ((log_w - log_w.mean()) / log_w.std()).astype(np.float32)

    release = np.full(n, -1, dtype=np.int64)
    perm = rng.permutation(n)
    n_cold, n_fresh = round(cold_fraction * n), round(_FRESH_FRACTION * n)
    cold_rows, fresh_rows = perm[:n_cold], perm[n_cold : n_cold + n_fresh]
    last = num_days - 1
    release[cold_rows] = np.minimum(train_end + 1 + np.floor(rng.exponential(2.0, n_cold)), last).astype(int)
    release[fresh_rows] = rng.integers(1, train_end + 1, n_fresh)
    cold = np.zeros(n, dtype=bool)
    cold[cold_rows] = True
    weight = np.exp(log_w)
    if n_cold:  # new releases are promoted: once out they get a fixed share of exposure
        weight[cold] *= _COLD_EXPOSURE / (1 - _COLD_EXPOSURE) * weight[~cold].sum() / weight[cold].sum()
    order = np.argsort(release, kind="stable")

    # Public features: noisy functions of the latent through a fixed random projection.
    proj = z @ rng.standard_normal((d, 10)) / math.sqrt(d)  # [N, 10]

    def noisy(*terms: np.ndarray, scale: float = 0.35) -> np.ndarray:
        return sum(terms) + rng.normal(0, scale, n)

    energy = _sigmoid(noisy(1.6 * proj[:, 0]))
    beat = _sigmoid(noisy(0.8 * proj[:, 2], 0.8 * proj[:, 4]))
    tempo = np.clip(120 + 25 * np.tanh(proj[:, 8]) + rng.normal(0, 8, n), 50, 220)
    year = np.where(release >= 0, int(start_date[:4]), 2018 - np.floor(rng.exponential(7, n))).clip(1950)
    pop_rank = np.argsort(np.argsort(log_w)) / max(n - 1, 1)
    a = np.linalg.qr(rng.standard_normal((d, d)))[0]  # orthogonal: <Az, Az'> = <z, z'>
    acoustic = np.tanh(0.5 * z @ a.T + rng.normal(0, 0.1, (n, d)))
    cols: dict[str, Any] = {
        "track_id": _uuids(rng, n, "t_"),
        "duration": np.clip(np.exp(rng.normal(math.log(220), 0.3, n)), 30, 1200),
        "release_year": year.astype(np.int64),
        "us_popularity_estimate": np.clip(90 + 9.99 * pop_rank + rng.normal(0, 0.2, n), 90, 99.999),
        "acousticness": _sigmoid(noisy(-1.4 * proj[:, 0], 0.6 * proj[:, 1])),
        "beat_strength": beat,
        "bounciness": _sigmoid(noisy(proj[:, 4])),
        "danceability": _sigmoid(noisy(1.2 * proj[:, 2])),
        "dyn_range_mean": 8 + 3 * np.tanh(noisy(-proj[:, 0])),
        "energy": energy,
        "flatness": 0.8 + 0.15 * np.tanh(noisy(proj[:, 1])),
        "instrumentalness": _sigmoid(noisy(1.5 * proj[:, 5], -1.0)),
        "key": rng.integers(0, 12, n),
        "liveness": _sigmoid(noisy(0.7 * proj[:, 7], -1.5)),
        "loudness": -10 + 4 * np.tanh(noisy(proj[:, 0])),
        "mechanism": _sigmoid(noisy(0.7 * proj[:, 0], 0.5 * proj[:, 5])),
        "mode": np.where(rng.random(n) < 0.65, "major", "minor").astype(object),
        "organism": _sigmoid(noisy(-0.7 * proj[:, 0], 0.5 * proj[:, 3])),
        "speechiness": _sigmoid(noisy(proj[:, 6], -2.0)),
        "tempo": tempo,
        "time_signature": rng.choice([4, 3, 5], n, p=[0.85, 0.1, 0.05]),
        "valence": _sigmoid(noisy(1.2 * proj[:, 3])),
        **{f"acoustic_vector_{i}": acoustic[:, i] for i in range(ACOUSTIC_DIM)},
    }
    types = {"track_id": pa.string(), "mode": pa.string(), "key": pa.int64(), "time_signature": pa.int64()}
    types["release_year"] = pa.int64()
    table = pa.table({c: pa.array(cols[c], type=types.get(c, pa.float64())) for c in TRACK_COLUMNS})
    return SyntheticWorld(
        latent=z,
        appeal=appeal,
        pop_z=pop_z,
        energy_c=(2 * energy - 1).astype(np.float32),
        beat=beat.astype(np.float32),
        tempo=tempo.astype(np.float32),
        release_day=release,
        cold=cold,
        order=order,
        sorted_release=release[order],
        cum_weight=np.cumsum(weight[order]),
        track_ids=cols["track_id"],
        tracks=table,
        start_date=start_date,
        num_days=num_days,
    )


def synthetic_audio(
    world: SyntheticWorld, n_mels: int, frames: int, seed: int, start: int, stop: int
) -> np.ndarray:
    """Spectrogram-like arrays of tracks ``start:stop``: float16 [n, n_mels, frames].

    Each latent dimension is a harmonic band whose height (mel position) and strength follow the
    latent, so the taste signal is in the audio; the lower bands pulse with the track's tempo, as
    strongly as its beat. Noise on top. Deterministic for (seed, start, stop).
    """
    rng = np.random.default_rng([seed, 4, start, stop])
    z = world.latent[start:stop].astype(np.float64)
    n = len(z)
    y = (np.arange(n_mels) + 0.5) / n_mels  # [M]
    centre = (np.arange(_DIM) + 0.5) / _DIM + 0.35 / _DIM * np.tanh(z)  # [n, D]
    amp = 0.1 + 0.5 * _sigmoid(1.2 * z)  # [n, D]
    width = max(0.6 / _DIM, 0.75 / n_mels)
    env = (amp[:, :, None] * np.exp(-0.5 * ((y[None, None, :] - centre[:, :, None]) / width) ** 2)).sum(1)
    t = np.arange(frames) / frames
    beats = world.tempo[start:stop, None] / 30.0  # about 4 beats per clip at 120 bpm
    phase = rng.uniform(0, 2 * math.pi, (n, 1))
    pulse = ((1 + np.cos(2 * math.pi * beats * t[None, :] + phase)) / 2) ** 3  # [n, T]
    low = np.clip(1.5 - 3 * y, 0, 1)  # [M]
    mod = 1 + world.beat[start:stop, None, None] * low[None, :, None] * (2 * pulse[:, None, :] - 1)
    spec = env[:, :, None] * mod + rng.normal(0, 0.05, (n, n_mels, frames))
    return spec.astype(np.float16)


def _users(num_users: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 3])
    hours = np.array([1, 1, 1, 1, 1, 1, 2, 4, 5, 5, 5, 5, 5, 5, 5, 6, 7, 8, 8, 8, 8, 6, 4, 2], dtype=float)
    return {
        "taste": rng.standard_normal((num_users, _DIM)).astype(np.float32),
        "premium": rng.random(num_users) < 0.65,
        "hour": rng.choice(24, num_users, p=hours / hours.sum()),
        "shuffle": rng.beta(1, 3, num_users),
        "context_cum": np.cumsum(rng.dirichlet(np.full(len(CONTEXT_TYPES), 0.5), num_users), axis=1),
    }


def _categorical(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise draws from cumulative probabilities ``cum`` [S, K] with uniforms ``u`` [S]."""
    return np.minimum((cum < u[:, None]).sum(1), cum.shape[1] - 1)


def generate_logs(
    world: SyntheticWorld, num_users: int, num_sessions: int, seed: int, chunk_sessions: int = 4096
) -> Iterator[pa.Table]:
    """Yield session logs in the published MSSD columns (:data:`LOG_COLUMNS`), ``chunk_sessions`` at a time.

    A session belongs to one hidden user (MSSD has no user column), has 10-20 events on one date and
    hour, draws ``_POOL`` tracks released by its date by popularity and plays the ones closest to the
    user's taste (plus a session drift) first, so the history predicts the next track. Skips follow the
    rule in :class:`SyntheticWorld`. Deterministic for a seed; any chunk can be regenerated alone.
    """
    if num_users < 1 or num_sessions < 1:
        raise DataError(f"num_users and num_sessions must be >= 1, got {num_users} and {num_sessions}")
    users = _users(num_users, seed)
    z, n_tracks = world.latent, len(world.latent)
    start = np.datetime64(world.start_date, "D")
    for c, s0 in enumerate(range(0, num_sessions, chunk_sessions)):
        rng = np.random.default_rng([seed, 2, c])
        S, L, K = min(chunk_sessions, num_sessions - s0), _MAX_LEN, min(_POOL, n_tracks)
        user = rng.integers(0, num_users, S)
        day = rng.integers(0, world.num_days, S)
        hour = (users["hour"][user] + np.rint(rng.normal(0, 2.0, S)).astype(int)) % 24
        length = rng.integers(_MIN_LEN, _MAX_LEN + 1, S)
        ctx0 = _categorical(users["context_cum"][user], rng.random(S))
        shuffle = rng.random(S) < users["shuffle"][user]
        premium = users["premium"][user]
        q = users["taste"][user] + 0.5 * rng.standard_normal((S, _DIM)).astype(np.float32)
        mood = 0.6 * rng.standard_normal(S)

        # S = sessions, K = pool, L = positions. The pool comes from tracks released by the date.
        n_avail = np.searchsorted(world.sorted_release, day, side="right")
        u = rng.random((S, K)) * world.cum_weight[n_avail - 1][:, None]
        slot = np.minimum(np.searchsorted(world.cum_weight, u, side="right"), n_avail[:, None] - 1)
        pool = world.order[slot]  # [S, K]
        aff = np.einsum("sd,skd->sk", q, z[pool]) / math.sqrt(_DIM)
        pick = np.argsort(-(1.5 * aff + rng.gumbel(size=(S, K))), axis=1)[:, :L]
        if K < L:  # a tiny catalogue: repeat the pool
            pick = np.tile(pick, (1, -(-L // K)))[:, :L]
        tracks = np.take_along_axis(pool, pick, 1)  # [S, L]
        aff_t = np.take_along_axis(aff, pick, 1)
        pos = np.arange(L)[None, :]  # 0-based

        switch = np.where(rng.random(S) < 0.15, rng.integers(1, length), L + 1)
        ctx_new = (ctx0 + rng.integers(1, len(CONTEXT_TYPES), S)) % len(CONTEXT_TYPES)
        ctx = np.where(pos >= switch[:, None], ctx_new[:, None], ctx0[:, None])
        hour_sig = np.cos(2 * math.pi * (hour - 15) / 24)
        logit = (
            np.where(premium, 1.6, 1.2)[:, None] * aff_t
            + world.appeal[tracks]
            + 0.9 * hour_sig[:, None] * world.energy_c[tracks]
            + _CONTEXT_EFFECT[ctx]
            + np.where(premium, 0.0, 0.4)[:, None]  # free users have few skips to spend
            + 0.25 * world.pop_z[tracks]
            - 0.3 * shuffle[:, None]
            + mood[:, None]
            - 0.04 * pos
            + _BIAS
        )
        played = rng.random((S, L)) < _sigmoid(logit)
        skip2 = ~played
        skip1 = skip2 & (rng.random((S, L)) < 0.55)
        skip3 = skip2 | (rng.random((S, L)) < 0.2)
        pause_u = rng.random((S, L))
        pause = np.where(pos == 0, (pause_u > 0.3).astype(int) + (pause_u > 0.5), 0)  # 0 none 1 short 2 long
        pause = np.where(pos > 0, (pause_u > 0.82).astype(int) + (pause_u > 0.94), pause)
        seekfwd = rng.poisson(np.where(skip3, 0.25, 0.08))
        seekback = rng.poisson(0.05, (S, L))
        end_u = rng.random((S, L))
        skipped_end = np.where(end_u < 0.85, 1, np.where(end_u < 0.95, 2, 3))  # fwdbtn, backbtn, clickrow
        last = pos == (length[:, None] - 1)
        skipped_end = np.where(last & (rng.random((S, L)) < 0.5), 7, skipped_end)  # endplay
        reason_end = np.where(skip3, skipped_end, 0)  # played to the end: trackdone
        first_start = np.array([3, 4, 5, 0])[
            _categorical(np.cumsum([[0.35, 0.25, 0.2, 0.2]], 1), rng.random(S))
        ]
        reason_start = np.concatenate([first_start[:, None], reason_end[:, :-1]], axis=1)

        valid = pos < length[:, None]
        per_event = np.repeat(np.arange(S), length)
        sids = _uuids(rng, S, f"{c}_")
        dates = (start + day).astype(str).astype(object)
        reasons, contexts = np.array(REASONS, dtype=object), np.array(CONTEXT_TYPES, dtype=object)
        cols = {
            "session_id": sids[per_event],
            "session_position": (pos + 1).repeat(S, 0)[valid],
            "session_length": length[per_event],
            "track_id_clean": world.track_ids[tracks[valid]],
            "skip_1": skip1[valid],
            "skip_2": skip2[valid],
            "skip_3": skip3[valid],
            "not_skipped": ~skip3[valid],
            "context_switch": (pos == switch[:, None])[valid].astype(np.int64),
            "no_pause_before_play": (pause == 0)[valid].astype(np.int64),
            "short_pause_before_play": (pause == 1)[valid].astype(np.int64),
            "long_pause_before_play": (pause == 2)[valid].astype(np.int64),
            "hist_user_behavior_n_seekfwd": seekfwd[valid],
            "hist_user_behavior_n_seekback": seekback[valid],
            "hist_user_behavior_is_shuffle": shuffle[per_event],
            "hour_of_day": hour[per_event],
            "date": dates[per_event],
            "premium": premium[per_event],
            "context_type": contexts[ctx[valid]],
            "hist_user_behavior_reason_start": reasons[reason_start[valid]],
            "hist_user_behavior_reason_end": reasons[reason_end[valid]],
        }
        yield pa.table({name: _published_array(name, cols[name]) for name in LOG_COLUMNS})


def _published_array(name: str, values: np.ndarray) -> pa.Array:
    if name in ("session_id", "track_id_clean", "date", "context_type") or name.endswith(
        ("reason_start", "reason_end")
    ):
        return pa.array(values, type=pa.string())
    if values.dtype == bool:
        return pa.array(values, type=pa.bool_())
    return pa.array(values.astype(np.int64), type=pa.int64())


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


# ---------------------------------------------------------------------------------------------
# Importer: published CSV files
# ---------------------------------------------------------------------------------------------


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
        raise DataError(f"unreadable CSV {path}: {_short(err)}") from None


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


def _read_csv(path: str, columns: Iterable[str], types: dict[str, pa.DataType]) -> pa.Table:
    columns = list(columns)
    opts = pa_csv.ConvertOptions(
        column_types={c: t for c, t in types.items() if c in columns},
        include_columns=columns,
        strings_can_be_null=False,
    )
    try:
        return pa_csv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"bad CSV {path}: {_short(err)}") from None


_LOG_TYPES = {
    **{c: pa.string() for c in LOG_COLUMNS},
    **{c: pa.bool_() for c in _FLAG_COLUMNS},  # pyarrow reads true/false and 1/0
    **{c: pa.int64() for c in _INT_COLUMNS},
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
        t = _read_csv(p, TRACK_COLUMNS, _TRACK_TYPES)
        tables.append(t.select(list(TRACK_COLUMNS)))
        where += [p] * t.num_rows
    return pa.concat_tables(tables), where


# ---------------------------------------------------------------------------------------------
# Logs -> events (shared by both sources)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
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


def _parse_logs(
    table: pa.Table, lookup: pa.Array, where: str, on_bad_row: str, stats: dict[str, int] | None
) -> _Parsed:
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
    ints = {c: _filled(table.column(c), 0).astype(np.int64) for c in _INT_COLUMNS}
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
    for c in _FLAG_COLUMNS:
        cols[c] = _filled(pc.cast(table.column(c), pa.bool_()), False)[idx]
    for c, vocab in (
        ("context_type", CONTEXT_TYPES),
        ("hist_user_behavior_reason_start", REASONS),
        ("hist_user_behavior_reason_end", REASONS),
    ):  # unknown values are not errors: they encode as all-zero one-hots
        code = pc.index_in(pc.utf8_trim_whitespace(table.column(c)), value_set=pa.array(vocab))
        cols[c] = _filled(code, -1).astype(np.int64)[idx]
    sids = table.column("session_id").to_numpy(zero_copy_only=False)[idx]
    return _Parsed(
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


def _event_features(c: dict[str, np.ndarray]) -> np.ndarray:
    """[E, F_event] float32 in EVENT_FEATURES order."""
    f = [c[k].astype(np.float32)[:, None] for k in EVENT_FEATURES[:8]]
    f.append(np.log1p(c["hist_user_behavior_n_seekfwd"].clip(0)).astype(np.float32)[:, None])
    f.append(np.log1p(c["hist_user_behavior_n_seekback"].clip(0)).astype(np.float32)[:, None])
    f.append(c["hist_user_behavior_is_shuffle"].astype(np.float32)[:, None])
    f.append(_one_hot(c["hist_user_behavior_reason_end"], len(REASONS)))
    return np.ascontiguousarray(np.concatenate(f, axis=1), dtype=np.float32)


def _context_features(c: dict[str, np.ndarray], day: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Catalogue features
# ---------------------------------------------------------------------------------------------


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

    raw = np.stack([num(c) for c in _NUMERIC_TRACK], 1)
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


def _standardise(feats: np.ndarray, warm: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    k = len(_NUMERIC_TRACK)
    ref = feats[warm, :k] if warm.any() else feats[:, :k]
    mean = ref.astype(np.float64).mean(0)
    std = ref.astype(np.float64).std(0)
    std[std < 1e-8] = 1.0
    out = feats.copy()
    out[:, :k] = (feats[:, :k] - mean) / std
    return out, mean.tolist(), std.tolist()


def _write_catalogue(
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


# ---------------------------------------------------------------------------------------------
# Events -> examples
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
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


def _new_counts() -> dict[str, dict[str, int]]:
    keys = ("sessions", "events", "queries", "rows", "positives", "cold_rows", "cold_queries")
    return {s: dict.fromkeys((*keys, "cold_positives"), 0) for s in SPLITS}


def _write_examples(
    writer: ShardWriter,
    parsed: _Parsed,
    plan: _Plan,
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
    parsed: _Parsed,
    s0: int,
    s1: int,
    plan: _Plan,
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
    ev = _event_features(c)
    ctx = _context_features(c, day[sess_of])
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

    sids, dates = parsed.session_id[s0:s1], _day_strings(day)
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


def _day_strings(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype="datetime64[D]").astype(str).astype(object)


# ---------------------------------------------------------------------------------------------
# prepare: source -> shards + catalogue + manifest
# ---------------------------------------------------------------------------------------------


def prepare(
    source: str,
    root: str,
    num_tracks: int = 2000,
    num_users: int = 300,
    num_sessions: int = 3000,
    rows_per_shard: int = 50_000,
    history_len: int = 10,
    negatives_per_event: int = 2,
    eval_negatives: int = 19,
    n_mels: int = 16,
    frames: int = 32,
    seed: int = 0,
    import_path: str | None = None,
    on_bad_row: str = "fail",
    num_days: int = 60,
    cold_fraction: float = 0.1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    start_date: str = "2018-07-15",
) -> dict:
    """Write the recsys dataset to ``root`` and return its manifest; an identical one is returned as is.

    ``source="synthetic"`` draws ``num_tracks`` tracks (with ``n_mels`` x ``frames`` audio) and
    ``num_sessions`` sessions of ``num_users`` hidden users over ``num_days`` days from ``start_date``;
    ``source="mssd"`` imports the CSVs under ``import_path`` (:func:`find_mssd_files`; the generator's
    size arguments are then unused). Splits are by session date (``split_days``). Every query gets
    ``negatives_per_event`` sampled negatives in train and ``eval_negatives`` in val/test.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise DataError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    for name, value, low in (
        ("history_len", history_len, 1),
        ("negatives_per_event", negatives_per_event, 0),
        ("eval_negatives", eval_negatives, 0),
        ("rows_per_shard", rows_per_shard, 1),
    ):
        if value < low:
            raise DataError(f"{name} must be >= {low}, got {value}")
    synthetic = source == "synthetic"
    if synthetic and (n_mels < 1 or frames < 1):
        raise DataError(f"n_mels and frames must be >= 1, got {n_mels} and {frames}")
    root = str(root)
    if synthetic:
        try:
            _dt.date.fromisoformat(start_date)
        except (TypeError, ValueError):
            raise DataError(f"start_date must be YYYY-MM-DD, got {start_date!r}") from None
        import_path, import_files = None, []
    else:
        if not import_path:
            raise DataError("data source 'mssd' needs an import path (the folder with the MSSD CSVs)")
        import_path = os.path.abspath(import_path)
        log_paths, track_paths = find_mssd_files(import_path)
        # size + mtime, not sha256: the full MSSD is ~50 GB of CSV
        import_files = [
            [os.path.relpath(p, import_path), os.path.getsize(p), os.stat(p).st_mtime_ns]
            for p in track_paths + log_paths
        ]
    args = {
        "source": source,
        "num_tracks": num_tracks if synthetic else None,
        "num_users": num_users if synthetic else None,
        "num_sessions": num_sessions if synthetic else None,
        "num_days": num_days if synthetic else None,
        "cold_fraction": cold_fraction if synthetic else None,
        "start_date": start_date if synthetic else None,
        "n_mels": n_mels if synthetic else None,
        "frames": frames if synthetic else None,
        "history_len": history_len,
        "negatives_per_event": negatives_per_event,
        "eval_negatives": eval_negatives,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "rows_per_shard": rows_per_shard,
        "import_path": import_path,
        "import_files": import_files,
        "on_bad_row": None if synthetic else on_bad_row,
    }
    existing = _existing(root, args)
    if existing is not None:
        return existing
    if synthetic:
        return _prepare_synthetic(root, args)
    return _prepare_mssd(root, args, log_paths, track_paths)


def _prepare_synthetic(root: str, args: dict) -> dict:
    a = args
    world = synthetic_world(
        a["num_tracks"], a["seed"], a["num_days"], a["cold_fraction"], a["val_fraction"], a["test_fraction"],
        a["start_date"],
    )  # fmt: skip
    first_day = int(np.datetime64(a["start_date"], "D").astype(np.int64))
    release = np.array([None] * len(world.release_day), dtype=object)
    has = world.release_day >= 0
    release[has] = _day_strings(first_day + world.release_day[has])

    def audio(lo: int, hi: int) -> np.ndarray:
        return synthetic_audio(world, a["n_mels"], a["frames"], a["seed"], lo, hi)

    logs = generate_logs(world, a["num_users"], a["num_sessions"], a["seed"])
    return _build(
        root, args, world.tracks, world.cold, world.release_day, release, first_day, a["num_days"],
        ((t, "synthetic logs") for t in logs), audio, [a["n_mels"], a["frames"]], {},
    )  # fmt: skip


def _prepare_mssd(root: str, args: dict, log_paths: list[str], track_paths: list[str]) -> dict:
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
        parsed = _parse_logs(_read_csv(p, LOG_COLUMNS, _LOG_TYPES), lookup, p, args["on_bad_row"], stats)
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
    release = _day_strings(first_seen[cat_rows])
    if any(stats[k] for k in ("skipped_rows", "skipped_tracks")):
        print(
            f"warning: skipped {stats['skipped_rows']} bad log row(s) ({stats['skipped_sessions']} whole "
            f"session(s), {stats['skipped_session_rows']} rows) and {stats['skipped_tracks']} bad track(s) "
            f"from {args['import_path']} (counts in {os.path.join(root, 'manifest.json')} meta.import)",
            file=sys.stderr,
        )

    def logs() -> Iterator[tuple[pa.Table, str]]:
        for p in log_paths:
            yield _read_csv(p, LOG_COLUMNS, _LOG_TYPES), p

    return _build(
        root, args, tracks.take(pa.array(cat_rows)), avail > train_end, avail, release, lo_day, num_days,
        logs(), None, None, stats, lookup=lookup, cat_rows=cat_rows,
    )  # fmt: skip


def _build(
    root: str,
    args: dict,
    tracks: pa.Table,
    cold: np.ndarray,
    avail: np.ndarray,
    release: np.ndarray,
    first_day: int,
    num_days: int,
    logs: Iterable[tuple[pa.Table, str]],
    audio: Callable[[int, int], np.ndarray] | None,
    audio_shape: list[int] | None,
    import_stats: dict[str, int],
    lookup: pa.Array | None = None,
    cat_rows: np.ndarray | None = None,
) -> dict:
    """Common tail of both sources: catalogue arrays, examples, tracks.parquet, manifest."""
    train_end, val_end = split_days(num_days, args["val_fraction"], args["test_fraction"])
    n = tracks.num_rows
    feats, acoustic, _ = track_feature_matrix(tracks)
    feats, mean, std = _standardise(feats, ~cold)
    track_ids = pc.utf8_trim_whitespace(tracks.column("track_id")).to_numpy(zero_copy_only=False)
    if lookup is None:  # the catalogue is the lookup
        lookup = pa.array(track_ids, type=pa.string())
        row_to_index = np.arange(1, n + 1, dtype=np.int64)
    else:
        row_to_index = np.zeros(len(lookup), dtype=np.int64)
        row_to_index[cat_rows] = np.arange(1, n + 1)
    order0 = np.argsort(avail, kind="stable")
    rank = np.zeros(n + 1, dtype=np.int64)
    rank[order0 + 1] = np.arange(n)
    plan = _Plan(
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
    counts = _new_counts()
    popularity = np.zeros(n + 1, dtype=np.int64)
    listens = np.zeros(n + 1, dtype=np.int64)
    rng = np.random.default_rng([args["seed"], 5])
    with ShardWriter(root, TASK, SCHEMA, args["rows_per_shard"], SPLITS) as writer:
        for table, where in logs:
            parsed = _parse_logs(table, lookup, where, args["on_bad_row"] or "fail", None)
            _write_examples(writer, parsed, plan, rng, counts, popularity, listens)
        tracks_path = os.path.join(root, TRACKS_FILE)
        _write_catalogue(
            tracks_path, track_ids, feats, acoustic, audio, audio_shape, cold, release, popularity[1:], listens[1:]
        )  # fmt: skip
        bounds = np.array([0, train_end, train_end + 1, val_end, val_end + 1, num_days - 1])
        d = _day_strings(first_day + bounds).tolist()
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
            "track_feature_stats": {"columns": list(_NUMERIC_TRACK), "mean": mean, "std": std},
            "acoustic_dim": ACOUSTIC_DIM,
            "has_audio": audio is not None,
            "audio_shape": audio_shape,
            "list_size": {s: 1 + plan.negatives[i] for i, s in enumerate(SPLITS)},
            "split_dates": {"train": d[0:2], "val": d[2:4], "test": d[4:6]},
            "label": "1 = played (not skip_2); 0 = skipped (skip_2) or a sampled negative",
            "counts": counts,
            "tracks_file": TRACKS_FILE,
            "tracks_rows": n,
            "import": import_stats,
        }
        return writer.close(meta)


def _existing(root: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if it was prepared with ``args``; None if there is none or it differs.

    Missing or damaged shards (or catalogue) of a matching dataset are an error naming the file.
    """
    manifest = reusable(root, TASK, lambda meta: meta.get("args") == args)
    if manifest is not None:
        _check_catalogue(root, manifest["meta"])
    return manifest


def _check_catalogue(root: str, meta: dict) -> None:
    path = os.path.join(str(root), TRACKS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"missing catalogue {path} (listed in {os.path.join(str(root), 'manifest.json')})")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise DataError(f"corrupt catalogue {path}: {_short(err)}") from None
    if rows != meta.get("tracks_rows"):
        raise DataError(f"catalogue {path} has {rows} tracks, the manifest says {meta.get('tracks_rows')}")


# ---------------------------------------------------------------------------------------------
# Reading: catalogue join and decoding
# ---------------------------------------------------------------------------------------------


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
        raise DataError(f"corrupt catalogue {path}: {_short(err)}") from None
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


def _candidates(cat: Catalogue, cand: np.ndarray) -> dict[str, np.ndarray]:
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
        **_candidates(cat, cand),
        "context": ctx.reshape(B, len(ctx) // max(B, 1)),
        "label": _column(batch["label"]).astype(np.float32),
        "is_negative": _column(batch["is_negative"]).astype(bool),
        "is_cold": _column(batch["is_cold"]).astype(bool),
    }


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
        ev = _event_features(events)
    else:
        ev = np.zeros((0, len(EVENT_FEATURES)), dtype=np.float32)
    c = {k: np.asarray([v]) for k, v in context.items() if k != "date"}
    c["context_type"] = np.asarray([_code(context["context_type"], CONTEXT_TYPES, "context_type")])
    c["hist_user_behavior_reason_start"] = np.asarray(
        [_code(context["hist_user_behavior_reason_start"], REASONS, "reason_start")]
    )
    day = np.asarray([np.datetime64(context["date"], "D").astype(np.int64)])
    ctx = _context_features(c, day)
    hist = np.zeros((B, H), dtype=np.int64)
    hist_f = np.zeros((B, H, ev.shape[1]), dtype=np.float32)
    mask = np.zeros((B, H), dtype=bool)
    if E:  # left padding; the most recent event sits at H - 1
        hist[:, H - E :], hist_f[:, H - E :], mask[:, H - E :] = tracks, ev, True
    return {
        "history_tracks": hist,
        "history_features": hist_f,
        "history_mask": mask,
        **_candidates(cat, cand),
        "context": np.repeat(ctx, B, axis=0),
        "is_cold": cat.is_cold[cand],
    }


def _column(col: Any) -> np.ndarray:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_numpy(zero_copy_only=False)
    return np.asarray(col)


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


# rows a training rank shuffles at a time (jobs.worker.train_batches' windows): many candidate
# lists, days and sessions in every batch
SHUFFLE_BUFFER_ROWS = 4096
# rows decoded by one call of decode_batch in a Ray Data task: per-batch overheads (Arrow to numpy
# and back, one output block each) cost more than decoding 256 rows does
DECODE_ROWS = 4096


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
    stream: a global ``random_shuffle`` per epoch is an all-to-all barrier (2.9 s to the first
    batch instead of 0.24 s and half the rows/s on 2 cores), and so is ``randomize_block_order``
    (every read finishes before the first decode: +0.2-0.3 s to the first batch). Rows are
    decoded ``batch_size`` at a time straight from Arrow (list columns flatten without a numpy
    object per row).
    """
    import ray.data

    manifest = manifest if manifest is not None else load_manifest(root)
    paths = readable_paths(root, manifest, split)
    meta = manifest.get("meta", {})
    _check_catalogue(root, meta)
    if shuffle:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    # read blocks of about one decode call each: Ray's default of 1 MiB blocks (~1,000 rows here)
    # pays a task and an object-store round trip per 1,000 rows (tiny recsys, 16 epochs in one
    # pass, a one-off measurement beside the bench: 66k -> 85k rows/s)
    blocks = max(1, math.ceil(manifest["splits"][split]["rows"] / batch_size))
    ds = ray.data.read_parquet(paths, override_num_blocks=blocks).select_columns(READ_COLUMNS)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "root": os.path.abspath(str(root)),
            "history_len": meta["history_len"],
            "event_features": meta["event_features"],
        },
        batch_format="pyarrow",
        batch_size=batch_size,
    )


def iter_split_numpy(
    root: str, split: str, batch_size: int, manifest: dict | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray).

    A batch may cut a candidate list; group by ``query_id`` for ranking metrics.
    """
    manifest = manifest if manifest is not None else load_manifest(root)
    paths = readable_paths(root, manifest, split)
    meta = manifest.get("meta", {})
    _check_catalogue(root, meta)
    kw = {"root": root, "history_len": meta["history_len"], "event_features": meta["event_features"]}
    for table in iter_tables(paths, READ_COLUMNS, batch_size):
        yield decode_batch(_table_batch(table), **kw)


def _table_batch(table: pa.Table) -> dict[str, Any]:
    return {name: table.column(name).combine_chunks() for name in table.column_names}


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
