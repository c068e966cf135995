"""Recsys data: MSSD-shaped generator, CSV importer, time split + cold start, candidate lists, decoding."""

from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_loaders import recsys as rs
from data_loaders.errors import DataError
from data_loaders.shards import shard_paths, verify

TINY = dict(
    source="synthetic", num_tracks=1500, num_users=250, num_sessions=2400, rows_per_shard=20_000,
    history_len=10, negatives_per_event=2, eval_negatives=19, n_mels=16, frames=32, seed=0,
)  # fmt: skip
SMALL = dict(TINY, num_tracks=200, num_users=40, num_sessions=120, rows_per_shard=5000, eval_negatives=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic dataset (about the recipe's size), prepared once for this module."""
    root = tmp_path_factory.mktemp("recsys") / "tiny"
    return root, rs.prepare(root=str(root), **TINY)


def _table(root, manifest, split, columns=None, filters=None) -> pa.Table:
    paths = shard_paths(root, manifest, split)
    return pa.concat_tables(pq.read_table(p, columns=columns, filters=filters) for p in paths)


# --- the published schema and the generator's semantics ---------------------------------------


@pytest.mark.timeout(30)
def test_generated_logs_follow_mssd_semantics():
    world = rs.synthetic_world(300, seed=3)
    assert world.tracks.column_names == list(rs.TRACK_COLUMNS)
    t = pa.concat_tables(rs.generate_logs(world, num_users=30, num_sessions=150, seed=3, chunk_sessions=64))
    assert t.column_names == list(rs.LOG_COLUMNS) and len(rs.LOG_COLUMNS) == 21
    c = {k: np.asarray(t.column(k).to_pylist()) for k in t.column_names}
    s1, s2, s3 = c["skip_1"], c["skip_2"], c["skip_3"]
    assert not (s1 & ~s2).any() and not (s2 & ~s3).any()  # skip_1 => skip_2 => skip_3
    assert np.array_equal(c["not_skipped"], ~s3)
    end = c["hist_user_behavior_reason_end"]
    assert np.array_equal(end == "trackdone", c["not_skipped"])  # played to the end <=> trackdone
    assert set(end[s3]) <= {"fwdbtn", "backbtn", "clickrow", "endplay"} and "fwdbtn" in set(end[s3])
    pauses = c["no_pause_before_play"] + c["short_pause_before_play"] + c["long_pause_before_play"]
    assert (pauses == 1).all()
    assert 0.4 < 1 - s2.mean() < 0.65  # about half played, as in MSSD
    sid = c["session_id"]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    assert len(starts) == len(set(sid)) == 150  # sessions contiguous
    for a, b in zip(starts, np.r_[starts[1:], len(sid)], strict=True):
        assert list(c["session_position"][a:b]) == list(range(1, b - a + 1))
        assert (c["session_length"][a:b] == b - a).all() and 10 <= b - a <= 20
        for col in ("date", "hour_of_day", "premium", "hist_user_behavior_is_shuffle"):
            assert len(set(c[col][a:b])) == 1, col
        # the next track starts the way the previous one ended
        assert list(c["hist_user_behavior_reason_start"][a + 1 : b]) == list(end[a : b - 1])
    assert set(c["context_type"]) <= set(rs.CONTEXT_TYPES)


@pytest.mark.timeout(30)
def test_generator_is_deterministic_and_audio_follows_the_latent():
    a, b = rs.synthetic_world(100, seed=1), rs.synthetic_world(100, seed=1)
    assert a.tracks.equals(b.tracks)
    la = pa.concat_tables(rs.generate_logs(a, 10, 20, seed=1))
    assert la.equals(pa.concat_tables(rs.generate_logs(b, 10, 20, seed=1)))
    audio = rs.synthetic_audio(a, n_mels=16, frames=32, seed=1, start=0, stop=100)
    assert audio.shape == (100, 16, 32) and audio.dtype == np.float16
    # band energies are a (noisy) function of the latent: a linear read-out recovers it
    x = np.c_[audio.astype(np.float32).mean(2), np.ones(100)]
    fit = np.linalg.lstsq(x, a.latent[:, 0], rcond=None)[0]
    assert np.corrcoef(x @ fit, a.latent[:, 0])[0, 1] > 0.8


# --- time split and cold start ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_time_split_and_cold_tracks(tiny):
    root, m = tiny
    meta = m["meta"]
    cat = rs.load_catalogue(root)
    assert meta["num_tracks"] == cat.size == TINY["num_tracks"] + 1
    assert meta["cold_tracks"] == int(cat.is_cold.sum()) == round(0.1 * TINY["num_tracks"])
    dates = {s: sorted(set(_table(root, m, s, ["date"]).column("date").to_pylist())) for s in rs.SPLITS}
    assert dates["train"][-1] < dates["val"][0] <= dates["val"][-1] < dates["test"][0]
    assert [dates["train"][0], dates["train"][-1]] == meta["split_dates"]["train"]
    # cold tracks are released after the last train day
    assert all(d > meta["split_dates"]["train"][1] for d in cat.release_date[cat.is_cold])
    train = _table(root, m, "train", ["candidate", "history_tracks", "is_cold"])
    assert not any(train.column("is_cold").to_pylist())
    assert not cat.is_cold[train.column("candidate").to_numpy()].any()
    hist = train.column("history_tracks").combine_chunks().flatten().to_numpy()
    assert not cat.is_cold[hist].any()  # not even in the history
    assert cat.listens[cat.is_cold].sum() == 0 and cat.listens.sum() == meta["counts"]["train"]["events"]
    assert (cat.popularity <= cat.listens).all() and cat.popularity.sum() > meta["counts"]["train"][
        "positives"
    ]
    for split in ("val", "test"):
        counts = meta["counts"][split]
        assert counts["cold_queries"] / counts["queries"] >= 0.1  # cold start is noticeable
        real = _table(root, m, split, ["candidate", "is_cold"], filters=[("is_negative", "==", False)])
        assert np.array_equal(
            real.column("is_cold").to_numpy(), cat.is_cold[real.column("candidate").to_numpy()]
        )
        assert sum(real.column("is_cold").to_pylist()) == counts["cold_queries"]


@pytest.mark.timeout(60)
def test_candidate_lists(tiny):
    root, m = tiny
    for split, size in (("val", 20), ("test", 20), ("train", 3)):
        t = _table(root, m, split, ["query_id", "candidate", "label", "is_negative"])
        assert m["meta"]["list_size"][split] == size
        q = np.asarray(t.column("query_id").to_pylist(), dtype=object)
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        lengths = np.diff(np.r_[starts, len(q)])
        assert len(starts) == len(set(q)) == m["meta"]["counts"][split]["queries"]  # contiguous lists
        assert (lengths == size).all() and len(q) == m["splits"][split]["rows"]
        neg = t.column("is_negative").to_numpy(zero_copy_only=False).reshape(-1, size)
        label = t.column("label").to_numpy().reshape(-1, size)
        cand = t.column("candidate").to_numpy().reshape(-1, size)
        assert ((~neg).sum(1) == 1).all()  # exactly one real event per list
        assert (label[neg] == 0).all()
        real = cand[~neg]
        assert ((cand == real[:, None]) == ~neg).all()  # negatives never repeat the real track
        slot = np.argmax(~neg, axis=1)
        assert len(set(slot.tolist())) > 1  # the real row is not always first
    assert 0.4 < m["meta"]["counts"]["val"]["positives"] / m["meta"]["counts"]["val"]["queries"] < 0.65


# --- the hidden rule is learnable ---------------------------------------------------------------


def _decoded(root, m, split, real_only=True) -> dict[str, np.ndarray]:
    filters = [("is_negative", "==", False)] if real_only else None
    t = _table(root, m, split, rs.READ_COLUMNS, filters)
    batch = {k: t.column(k).combine_chunks() for k in t.column_names}
    return rs.decode_batch(batch, str(root), m["meta"]["history_len"], m["meta"]["event_features"])


def _taste_features(b: dict[str, np.ndarray], cat: rs.Catalogue) -> np.ndarray:
    """Mean acoustic vector of the played history tracks x the candidate's, plus candidate and context."""
    played = b["history_mask"] & (b["history_features"][:, :, rs.EVENT_FEATURES.index("skip_2")] == 0)
    w = played.astype(np.float32)[..., None]
    taste = (cat.acoustic[b["history_tracks"]] * w).sum(1) / np.maximum(w.sum(1), 1)
    cand = b["candidate_acoustic"]
    return np.concatenate([taste * cand, cand, b["candidate_features"], b["context"]], 1)


@pytest.mark.timeout(90)
def test_hidden_rule_is_learnable_and_audio_carries_it_for_cold_tracks(tiny):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    root, m = tiny
    cat = rs.load_catalogue(root)
    tr, va = _decoded(root, m, "train"), _decoded(root, m, "val")
    model = LogisticRegression(max_iter=500).fit(_taste_features(tr, cat), tr["label"])
    p = model.predict_proba(_taste_features(va, cat))[:, 1]
    auc = roc_auc_score(va["label"], p)
    cold = va["is_cold"]
    auc_cold = roc_auc_score(va["label"][cold], p[cold])

    # audio alone (band means and temporal spread), trained on warm tracks, judged on cold ones
    def audio(b):
        return np.concatenate([b["candidate_audio"].mean(2), b["candidate_audio"].std(2)], 1)

    audio_model = LogisticRegression(max_iter=1000).fit(audio(tr), tr["label"])
    auc_audio_cold = roc_auc_score(va["label"][cold], audio_model.predict_proba(audio(va)[cold])[:, 1])
    print(f"val AUC {auc:.3f}, cold {auc_cold:.3f}, audio-only on cold tracks {auc_audio_cold:.3f}")
    assert auc > 0.7 and auc_cold > 0.65 and auc_audio_cold > 0.62


# --- importer ---------------------------------------------------------------------------------


def _rewrite_csv(path, fn) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = fn(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.mark.timeout(60)
def test_mssd_import_round_trip(tmp_path):
    paths = rs.write_mssd_csv(str(tmp_path / "mssd"), num_tracks=300, num_users=40, num_sessions=300)
    with open(paths["logs"][0]) as f:
        assert f.readline().strip() == ",".join(rs.LOG_COLUMNS)  # bare header, as published
    with open(paths["track_features"][0]) as f:
        assert f.readline().strip() == ",".join(rs.TRACK_COLUMNS)
    m = rs.prepare("mssd", str(tmp_path / "d"), import_path=str(tmp_path / "mssd"), eval_negatives=9)
    meta = m["meta"]
    assert meta["has_audio"] is False and meta["audio_shape"] is None and meta["args"]["num_tracks"] is None
    assert meta["cold_tracks"] > 0 and meta["counts"]["val"]["cold_queries"] > 0
    assert meta["counts"]["train"]["cold_rows"] == 0
    rows = 0
    for p in paths["logs"]:
        with open(p) as f:
            rows += sum(1 for _ in f) - 1
    assert sum(c["events"] for c in meta["counts"].values()) == rows
    cat = rs.load_catalogue(tmp_path / "d")
    assert cat.audio is None and cat.size == meta["num_tracks"] == meta["catalogue_tracks"] + 1
    first_train = min(d for d in cat.release_date[1:])
    assert first_train == meta["split_dates"]["train"][0]  # imported release = first day in the logs
    b = next(rs.iter_split_numpy(tmp_path / "d", "val", 10))
    assert "candidate_audio" not in b and b["candidate_acoustic"].shape == (10, 8)


@pytest.mark.timeout(60)
def test_mssd_import_names_bad_columns(tmp_path):
    src = tmp_path / "mssd"
    paths = rs.write_mssd_csv(str(src), num_tracks=100, num_users=10, num_sessions=30, log_files=1)
    log, tf = paths["logs"][0], paths["track_features"][0]
    _rewrite_csv(log, lambda rows: [[("skip2" if c == "skip_2" else c) for c in rows[0]], *rows[1:]])
    with pytest.raises(DataError) as err:
        rs.prepare("mssd", str(tmp_path / "d"), import_path=str(src))
    msg = str(err.value)
    assert log in msg and "skip_2 (the file has 'skip2': misspelled?)" in msg and "\n" not in msg
    _rewrite_csv(log, lambda rows: [[("skip_2" if c == "skip2" else c) for c in rows[0]], *rows[1:]])

    def without(rows, names=("energy", "mode")):
        keep = [i for i, c in enumerate(rows[0]) if c not in names]
        return [[r[i] for i in keep] for r in rows]

    _rewrite_csv(tf, without)
    with pytest.raises(DataError, match=rf"{tf} lacks MSSD track features column\(s\): energy, mode$"):
        rs.prepare("mssd", str(tmp_path / "d"), import_path=str(src))
    with pytest.raises(DataError, match="no session log CSV"):
        rs.prepare("mssd", str(tmp_path / "d"), import_path=str(tmp_path / "mssd" / "track_features"))
    with pytest.raises(DataError, match="data path not found"):
        rs.prepare("mssd", str(tmp_path / "d"), import_path=str(tmp_path / "nowhere"))


@pytest.mark.timeout(60)
def test_mssd_import_unknown_track_fails_or_skips(tmp_path, capsys):
    src = tmp_path / "mssd"
    paths = rs.write_mssd_csv(str(src), num_tracks=150, num_users=20, num_sessions=60, log_files=1)
    log = paths["logs"][0]

    def break_row(rows):
        rows[5][rows[0].index("track_id_clean")] = "t_not-a-track"
        return rows

    _rewrite_csv(log, break_row)
    with pytest.raises(DataError, match=rf"{log} line 6: unknown track id .*'t_not-a-track'"):
        rs.prepare("mssd", str(tmp_path / "d"), import_path=str(src))
    m = rs.prepare("mssd", str(tmp_path / "d"), import_path=str(src), on_bad_row="skip")
    imp = m["meta"]["import"]
    assert imp["skipped_rows"] == 1 and imp["skipped_sessions"] == 1 and imp["skipped_session_rows"] >= 10
    assert "skipped 1 bad log row(s)" in capsys.readouterr().err
    with open(log) as f:
        rows = sum(1 for _ in f) - 1
    assert sum(c["events"] for c in m["meta"]["counts"].values()) == rows - imp["skipped_session_rows"]


# --- prepare, decoding, reading ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prepare_is_idempotent(tmp_path, tiny):
    root, m = tiny
    mtime = os.path.getmtime(root / "manifest.json")
    assert rs.prepare(root=str(root), **TINY) == m and os.path.getmtime(root / "manifest.json") == mtime
    small = rs.prepare(root=str(tmp_path), **SMALL)
    verify(tmp_path, small, check_hash=True)
    assert rs.prepare(root=str(tmp_path), **{**SMALL, "seed": 1})["fingerprint"] != small["fingerprint"]
    (tmp_path / rs.TRACKS_FILE).unlink()
    with pytest.raises(DataError, match="missing catalogue"):
        rs.prepare(root=str(tmp_path), **{**SMALL, "seed": 1})
    with pytest.raises(DataError, match="on_bad_row must be one of"):
        rs.prepare(root=str(tmp_path), **{**SMALL, "on_bad_row": "ignore"})


@pytest.mark.timeout(60)
def test_decoded_shapes_and_left_padding(tiny):
    root, m = tiny
    meta = m["meta"]
    H, F, B = meta["history_len"], meta["event_features"], 64
    assert (F, meta["context_features"], meta["track_features"]) == (24, 32, 24)
    assert meta["has_audio"] and meta["audio_shape"] == [16, 32]
    b = next(rs.iter_split_numpy(root, "val", B))
    expected = {
        "query_id": (object, (B,)),
        "history_tracks": (np.int64, (B, H)),
        "history_features": (np.float32, (B, H, F)),
        "history_mask": (bool, (B, H)),
        "candidate": (np.int64, (B,)),
        "candidate_features": (np.float32, (B, 24)),
        "candidate_audio": (np.float32, (B, 16, 32)),
        "candidate_acoustic": (np.float32, (B, 8)),
        "context": (np.float32, (B, 32)),
        "label": (np.float32, (B,)),
        "is_negative": (bool, (B,)),
        "is_cold": (bool, (B,)),
    }
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        k: (np.dtype(t), s) for k, (t, s) in expected.items()
    }
    mask = b["history_mask"]
    assert mask[:, -1].all() and (np.diff(mask.astype(int), axis=1) >= 0).all()  # padding on the left
    assert ((b["history_tracks"] > 0) == mask).all() and (b["history_features"][~mask] == 0).all()
    stored = _table(root, m, "val", ["history_tracks", "candidate"]).slice(0, B)
    for i, h in enumerate(stored.column("history_tracks").to_pylist()):
        assert list(b["history_tracks"][i, H - len(h) :]) == h
    cat = rs.load_catalogue(root)
    assert np.array_equal(b["candidate_features"], cat.features[b["candidate"]])
    assert rs.load_catalogue(root) is cat  # loaded once per process
    # decoding with a shorter history keeps the most recent events
    rows = _table(root, m, "val", rs.READ_COLUMNS).slice(0, B)
    short = rs.decode_batch({k: rows.column(k).combine_chunks() for k in rows.column_names}, str(root), 3, F)
    assert np.array_equal(short["history_tracks"], b["history_tracks"][:, -3:])
    assert np.array_equal(short["history_features"], b["history_features"][:, -3:])


@pytest.mark.timeout(240)
def test_read_split_with_ray(ray_local, tmp_path):
    m = rs.prepare(root=str(tmp_path), **SMALL)
    ds = rs.read_split(tmp_path, "val", manifest=m)
    batches = list(
        ds.iter_batches(batch_size=16, batch_format="numpy")
    )  # one pass: Ray Data is slow to start
    b = batches[0]
    assert set(b) == {
        "query_id", "history_tracks", "history_features", "history_mask", "candidate", "candidate_features",
        "candidate_audio", "candidate_acoustic", "context", "label", "is_negative", "is_cold",
    }  # fmt: skip
    assert b["history_features"].shape == (16, 10, 24) and b["candidate_audio"].shape == (16, 16, 32)
    assert b["history_tracks"].dtype == np.int64 and b["candidate_audio"].dtype == np.float32
    assert sum(len(x["label"]) for x in batches) == m["splits"]["val"]["rows"]
    path = tmp_path / m["splits"]["val"]["shards"][0]["path"]
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"corrupt Parquet shard .*val/part-00000\.parquet"):
        rs.read_split(tmp_path, "val", manifest=m)
