"""The synthetic world: a hidden taste model behind MSSD-shaped session logs and track features."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import DataError
from .schema import ACOUSTIC_DIM, CONTEXT_TYPES, LOG_COLUMNS, REASONS, TRACK_COLUMNS, split_days

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
