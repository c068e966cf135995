"""Data layer: shard writer + manifest, verify, patient splits, generator, importers, decoding."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from data_loaders import retinopathy as rd
from data_loaders.errors import DataError
from data_loaders.shards import load_manifest, sha256_file, shard_paths, verify, write_splits
from jobs import tasks

SMALL = pa.schema([("id", pa.int64()), ("text", pa.string())])


def _rows(n: int, start: int = 0, text: str = "x") -> list[dict]:
    return [{"id": i, "text": f"{text}{i}"} for i in range(start, start + n)]


def _write_small(root, text: str = "x") -> dict:
    splits = {"train": _rows(7, text=text), "val": _rows(2, 100, text), "test": []}
    return write_splits(str(root), "demo", splits, SMALL, rows_per_shard=3, meta={"k": 1})


# --- shards + manifest ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_write_splits_writes_shards_and_manifest(tmp_path):
    m = _write_small(tmp_path / "d")
    assert m == json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["task"] == "demo" and m["format_version"] == 1 and m["meta"] == {"k": 1}
    assert m["schema"] == [{"name": "id", "type": "int64"}, {"name": "text", "type": "string"}]
    assert [sh["rows"] for sh in m["splits"]["train"]["shards"]] == [3, 3, 1]
    assert m["splits"]["train"]["rows"] == 7 and m["splits"]["val"]["rows"] == 2
    assert m["splits"]["test"] == {"rows": 0, "shards": []}
    assert m["splits"]["train"]["shards"][1]["path"] == "train/part-00001.parquet"
    for split in ("train", "val"):
        for sh, path in zip(m["splits"][split]["shards"], shard_paths(tmp_path / "d", m, split), strict=True):
            assert os.path.isabs(path) and sha256_file(path) == sh["sha256"]
            assert os.path.getsize(path) == sh["bytes"]
    ids = [
        r for p in shard_paths(tmp_path / "d", m, "train") for r in pq.read_table(p).column("id").to_pylist()
    ]
    assert ids == list(range(7))
    assert not [f for f in os.listdir(tmp_path / "d") if ".tmp" in f]  # atomic write left nothing behind


@pytest.mark.timeout(30)
def test_fingerprint_stable_and_data_sensitive(tmp_path):
    a, b = _write_small(tmp_path / "a"), _write_small(tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"] and len(a["fingerprint"]) == 64
    assert _write_small(tmp_path / "c", text="y")["fingerprint"] != a["fingerprint"]


@pytest.mark.timeout(30)
def test_rewrite_drops_stale_shards(tmp_path):
    _write_small(tmp_path)
    m = write_splits(str(tmp_path), "demo", {"train": _rows(2)}, SMALL, rows_per_shard=3)
    assert sorted(os.listdir(tmp_path / "train")) == ["part-00000.parquet"]
    verify(tmp_path, m)


@pytest.mark.timeout(30)
def test_load_manifest_missing(tmp_path):
    with pytest.raises(DataError, match="manifest.json is missing"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        load_manifest(tmp_path)


@pytest.mark.timeout(30)
def test_verify_names_truncated_and_missing_shards(tmp_path):
    m = _write_small(tmp_path)
    verify(tmp_path, m, check_hash=True)
    shard = tmp_path / "train" / "part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"corrupt Parquet shard .*train/part-00001\.parquet") as err:
        verify(tmp_path, m)
    assert "\n" not in str(err.value)
    verify(tmp_path, m, splits=["val"])  # other splits are not touched
    shard.unlink()
    with pytest.raises(DataError, match=r"missing Parquet shard .*train/part-00001\.parquet"):
        verify(tmp_path, m)
    with pytest.raises(DataError, match="no split 'holdout'"):
        verify(tmp_path, m, splits=["holdout"])


@pytest.mark.timeout(30)
def test_verify_row_count_and_hash(tmp_path):
    m = _write_small(tmp_path)
    path = tmp_path / "val" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(2, 100, "changed"), schema=SMALL), path)
    verify(tmp_path, m)  # same row count: only the hash can tell
    with pytest.raises(DataError, match=r"val/part-00000\.parquet changed"):
        verify(tmp_path, m, check_hash=True)
    pq.write_table(pa.Table.from_pylist(_rows(5), schema=SMALL), path)
    with pytest.raises(DataError, match=r"val/part-00000\.parquet has 5 rows, the manifest says 2"):
        verify(tmp_path, m)


# --- splits -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_split_by_patient():
    records = [{"patient_id": f"p{i}", "eye": eye} for i in range(2000) for eye in ("left", "right")]
    splits = rd.split_by_patient(records, 0.1, 0.2, seed=7)
    patients = {s: {r["patient_id"] for r in rs} for s, rs in splits.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(rs) for rs in splits.values()) == len(records)
    assert abs(len(splits["val"]) / len(records) - 0.1) < 0.03
    assert abs(len(splits["test"]) / len(records) - 0.2) < 0.03
    assert rd.split_by_patient(records, 0.1, 0.2, seed=7) == splits
    assert rd.split_by_patient(records, 0.1, 0.2, seed=8)["test"] != splits["test"]
    with pytest.raises(DataError, match="val_fraction"):
        rd.split_by_patient(records, 0.5, 0.5, seed=7)


# --- synthetic generator ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_generate_is_deterministic():
    a = list(rd.generate(9, 32, seed=3))
    assert a == list(rd.generate(9, 32, seed=3))
    assert [r["image"] for r in a] != [r["image"] for r in rd.generate(9, 32, seed=4)]
    assert [r["image_id"] for r in a[:3]] == ["synth_00000_left", "synth_00000_right", "synth_00001_left"]
    assert a[-1]["image_id"] == "synth_00004_left"  # an odd count ends with a one-eyed patient
    assert all(r["patient_id"] == r["image_id"].rsplit("_", 1)[0] for r in a)
    pa.Table.from_pylist(a, schema=rd.SCHEMA)  # records fit the schema
    img = np.asarray(Image.open(io.BytesIO(a[0]["image"])))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[0, 0].max() < 30 and img[16, 16].mean() > 40  # dark outside the retina, lit inside


@pytest.mark.timeout(60)
def test_generate_class_mix_and_label_noise():
    n = 600
    clean = np.array([r["label"] for r in rd.generate(n, 16, seed=1, label_noise=0.0)])
    share = np.bincount(clean, minlength=5) / n
    assert np.abs(share - np.asarray(rd.CLASS_MIX)).max() < 0.06
    noisy = np.array([r["label"] for r in rd.generate(n, 16, seed=1, label_noise=0.3)])
    changed = noisy != clean
    assert 0.2 < changed.mean() < 0.4 and np.abs(noisy - clean)[changed].max() == 1


@pytest.mark.timeout(30)
def test_render_fundus_shapes_and_grades():
    for grade in range(5):
        img = rd.render_fundus(np.random.default_rng(grade), grade, 64, "right")
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError):
        rd.render_fundus(np.random.default_rng(0), 5, 64, "left")


# --- importers --------------------------------------------------------------------------------


def _photo(path, size=(120, 90), fmt=None) -> None:
    """A fake fundus photo: an orange disc on a black, wider-than-tall frame."""
    img = Image.new("RGB", size)
    r = min(size) // 2 - 2
    cx, cy = size[0] // 2, size[1] // 2
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 90, 40))
    img.save(path, format=fmt)


def _eyepacs(root, rows=("10_left,0", "10_right,2", "11_left,4"), header="image,level", sub="train"):
    os.makedirs(root / sub, exist_ok=True)
    (root / "trainLabels.csv").write_text("\n".join([header, *rows]) + "\n")
    for row in rows:
        _photo(root / sub / f"{row.split(',')[0]}.jpeg", fmt="JPEG")
    return root


def _aptos(root, ids=("000c1434d8d7", "001639a390f0"), in_sub=True):
    folder = root / "train_images" if in_sub else root
    os.makedirs(folder, exist_ok=True)
    (root / "train.csv").write_text(
        "id_code,diagnosis\n" + "".join(f"{i},{k % 5}\n" for k, i in enumerate(ids))
    )
    for i in ids:
        _photo(folder / f"{i}.png")
    return root


@pytest.mark.timeout(30)
def test_eyepacs_importer(tmp_path):
    root = _eyepacs(tmp_path)
    assert rd.detect_layout(str(root)) == "eyepacs"
    recs = list(rd.import_images("eyepacs", str(root), 48))
    assert [(r["image_id"], r["patient_id"], r["eye"], r["label"]) for r in recs] == [
        ("10_left", "10", "left", 0),
        ("10_right", "10", "right", 2),
        ("11_left", "11", "left", 4),
    ]
    img = np.asarray(Image.open(io.BytesIO(recs[0]["image"])))
    assert img.shape == (48, 48, 3)
    # the black border was cropped: the retina fills the square edge to edge at mid-height
    assert img[24, 1].mean() > 60 and img[24, 46].mean() > 60
    pa.Table.from_pylist(recs, schema=rd.SCHEMA)


@pytest.mark.timeout(30)
def test_aptos_importer(tmp_path):
    for in_sub in (True, False):
        root = _aptos(tmp_path / str(in_sub), in_sub=in_sub)
        assert rd.detect_layout(str(root)) == "aptos"
        recs = list(rd.import_images("aptos", str(root), None))
        assert [(r["patient_id"], r["eye"], r["label"]) for r in recs] == [
            ("000c1434d8d7", "", 0),
            ("001639a390f0", "", 1),
        ]
        w, h = Image.open(io.BytesIO(recs[0]["image"])).size
        assert w == h and 84 <= w <= 90  # native size: the 86 px retina cropped out of 120 x 90


@pytest.mark.timeout(30)
def test_detect_layout_errors(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*missing"):
        rd.detect_layout(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="trainLabels.csv or train.csv"):
        rd.detect_layout(str(tmp_path))


@pytest.mark.timeout(30)
def test_misspelled_column_is_named(tmp_path):
    root = _eyepacs(tmp_path, header="image,levle")
    with pytest.raises(DataError, match=r"lacks column\(s\) level \(found: image, levle\)"):
        list(rd.import_images("eyepacs", str(root), 32))


@pytest.mark.timeout(30)
def test_bad_label_is_named(tmp_path):
    root = _eyepacs(tmp_path, rows=("10_left,0", "10_right,7"))
    with pytest.raises(DataError, match="line 3: bad row 10_right"):
        list(rd.import_images("eyepacs", str(root), 32))


@pytest.mark.timeout(30)
def test_bad_images_skip_or_fail(tmp_path):
    root = _eyepacs(tmp_path, rows=("10_left,0", "10_right,2", "11_left,4", "12_left,1"))
    (root / "train" / "10_right.jpeg").write_bytes(b"this is not a jpeg")
    (root / "train" / "12_left.jpeg").unlink()
    skipped: list[str] = []
    recs = list(rd.import_images("eyepacs", str(root), 32, on_bad_image="skip", skipped=skipped))
    assert [r["image_id"] for r in recs] == ["10_left", "11_left"]
    assert skipped == ["10_right", "12_left"]
    with pytest.raises(DataError, match=r"bad image .*train/10_right\.jpeg \(id 10_right\)") as err:
        list(rd.import_images("eyepacs", str(root), 32, on_bad_image="fail"))
    assert "\n" not in str(err.value)


# --- prepare ----------------------------------------------------------------------------------


def _prepare(root, **kw) -> dict:
    args = dict(
        source="synthetic", root=str(root), num_images=40, image_size=32, rows_per_shard=8,
        val_fraction=0.2, test_fraction=0.2, seed=0, label_noise=0.05, import_path=None, on_bad_image="fail",
    )  # fmt: skip
    return rd.prepare(**{**args, **kw})


@pytest.mark.timeout(60)
def test_prepare_synthetic_is_idempotent(tmp_path):
    m = _prepare(tmp_path)
    meta = m["meta"]
    assert meta["source"] == "synthetic" and meta["image_size"] == 32 and meta["skipped_images"] == []
    assert sum(m["splits"][s]["rows"] for s in rd.SPLITS) == 40
    assert {s: sum(c) for s, c in meta["class_counts"].items()} == {
        s: m["splits"][s]["rows"] for s in rd.SPLITS
    }
    patients = {
        s: {
            p
            for path in shard_paths(tmp_path, m, s)
            for p in pq.read_table(path).column("patient_id").to_pylist()
        }
        for s in rd.SPLITS
    }
    assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values())) == 20
    verify(tmp_path, m, check_hash=True)
    mtime = os.path.getmtime(tmp_path / "manifest.json")
    assert _prepare(tmp_path) == m and os.path.getmtime(tmp_path / "manifest.json") == mtime
    assert _prepare(tmp_path, seed=1)["fingerprint"] != m["fingerprint"]  # other arguments: regenerated


@pytest.mark.timeout(60)
def test_prepare_import_records_skipped(tmp_path, capsys):
    root = _eyepacs(tmp_path / "src", rows=("10_left,0", "10_right,2", "11_left,4"))
    (root / "train" / "11_left.jpeg").write_bytes(b"\x89PNG broken")
    m = _prepare(tmp_path / "d", source="auto", import_path=str(root), on_bad_image="skip", num_images=0)
    assert m["meta"]["source"] == "eyepacs" and m["meta"]["skipped_images"] == ["11_left"]
    assert sum(m["splits"][s]["rows"] for s in rd.SPLITS) == 2
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    again = dict(source="eyepacs", import_path=str(root), on_bad_image="skip", num_images=0)
    assert _prepare(tmp_path / "d", **again) == m and capsys.readouterr().err == ""  # reused, silent
    (root / "trainLabels.csv").write_text("image,level\n10_left,1\n10_right,2\n")  # labels corrected
    assert _prepare(tmp_path / "d", **again)["meta"]["class_counts"] != m["meta"]["class_counts"]
    with pytest.raises(DataError, match="holds a eyepacs layout, not aptos"):
        _prepare(tmp_path / "e", source="aptos", import_path=str(root))
    with pytest.raises(DataError, match="data path not found"):
        _prepare(tmp_path / "e", source="auto", import_path=str(tmp_path / "nope"))


# --- decoding and reading ---------------------------------------------------------------------


def _batch(n: int = 4, size: int = 32) -> dict[str, np.ndarray]:
    recs = list(rd.generate(n, size, seed=5))
    return {
        "image_id": np.array([r["image_id"] for r in recs], dtype=object),
        "image": np.array([r["image"] for r in recs], dtype=object),
        "label": np.array([r["label"] for r in recs], dtype=np.int8),
    }


@pytest.mark.timeout(30)
def test_decode_batch_shapes_and_determinism():
    batch = _batch()
    out = rd.decode_batch(batch, 32, augment=False)
    assert out["image"].shape == (4, 3, 32, 32) and out["image"].dtype == np.uint8  # normalised on the device
    assert out["label"].dtype == np.int64 and list(out["label"]) == list(batch["label"])
    assert list(out["image_id"]) == list(batch["image_id"])
    assert np.array_equal(out["image"], rd.decode_batch(batch, 32, augment=False)["image"])
    assert np.array_equal(out["image"][0], rd.preprocess_image(batch["image"][0], 32))  # one shared transform
    x = tasks.get("retinopathy").inputs(out, torch.device("cpu"), torch.float32)[0]  # the model's input
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.5  # normalised with MEAN and STD
    aug = rd.decode_batch(batch, 32, augment=True, seed=1)["image"]
    assert np.array_equal(aug, rd.decode_batch(batch, 32, augment=True, seed=1)["image"])
    assert not np.array_equal(aug, out["image"])
    assert rd.decode_batch(batch, 24, augment=False)["image"].shape == (4, 3, 24, 24)  # resized


@pytest.mark.timeout(30)
def test_decode_batch_names_bad_image():
    batch = _batch(2)
    batch["image"][1] = b"garbage"
    with pytest.raises(DataError, match="cannot decode image synth_00000_right"):
        rd.decode_batch(batch, 32, augment=False)


@pytest.mark.timeout(30)
def test_preprocess_image_accepts_jpeg_photos(tmp_path):
    _photo(tmp_path / "p.jpg", size=(300, 200), fmt="JPEG")
    x = rd.preprocess_image((tmp_path / "p.jpg").read_bytes(), 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.uint8


@pytest.mark.timeout(60)
def test_iter_split_numpy_batches_across_shards(tmp_path):
    m = _prepare(tmp_path, num_images=30, val_fraction=0.1, test_fraction=0.1)
    rows = m["splits"]["train"]["rows"]
    batches = list(rd.iter_split_numpy(tmp_path, "train", 5, 32))
    assert [len(b["label"]) for b in batches[:-1]] == [5] * (len(batches) - 1)
    assert sum(len(b["label"]) for b in batches) == rows and rows > 8  # spans several shards
    ids = [
        i
        for path in shard_paths(tmp_path, m, "train")
        for i in pq.read_table(path).column("image_id").to_pylist()
    ]
    assert [i for b in batches for i in b["image_id"]] == ids
    assert batches[0]["image"].shape == (5, 3, 32, 32)


@pytest.mark.timeout(180)
def test_read_split_with_ray(tmp_path, ray_local):
    m = _prepare(tmp_path, num_images=24)
    ds = rd.read_split(tmp_path, "train", 32, augment=True, manifest=m)
    batches = list(ds.iter_batches(batch_size=4, batch_format="numpy"))  # one pass: Ray Data is slow to start
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["image"].dtype == np.uint8
    assert set(batches[0]) == {"image", "label", "image_id"}
    assert sum(len(b["label"]) for b in batches) == m["splits"]["train"]["rows"]
    path = tmp_path / m["splits"]["train"]["shards"][0]["path"]
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"corrupt Parquet shard .*train/part-00000\.parquet"):
        rd.read_split(tmp_path, "train", 32, augment=False, manifest=m)
