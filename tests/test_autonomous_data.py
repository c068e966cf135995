"""Autonomous rig data: geometry of the generator, prepare + stats, decoding, rig import/export, readers."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_loaders import autonomous as au
from data_loaders.errors import DataError
from data_loaders.shards import shard_paths, verify

SIZE = (48, 64)  # H, W
MAX_BOXES, LANES, POINTS = 6, 4, 8
C = au.NUM_CAMERAS


def _scenes(n: int, seed: int = 0, size=SIZE):
    """(scene, render) pairs exactly as generate(n, size, seed) draws them."""
    for i in range(n):
        scene = au.make_scene(np.random.default_rng([seed, i]), MAX_BOXES, LANES)
        yield scene, au.render_scene(scene, size, POINTS)


def _records(n: int, seed: int = 0) -> list[dict]:
    return list(au.generate(n, SIZE, seed, MAX_BOXES, LANES, POINTS))


def _prepare(root, **kw) -> dict:
    args = dict(
        source="synthetic", root=str(root), num_samples=24, image_size=SIZE, rows_per_shard=5,
        val_fraction=0.2, test_fraction=0.2, seed=0, max_boxes=MAX_BOXES, num_lanes=LANES,
        lane_points=POINTS, import_path=None, on_bad_sample="fail",
    )  # fmt: skip
    return au.prepare(**{**args, **kw})


def _rows(root, manifest) -> dict[str, dict]:
    return {
        r["sample_id"]: r
        for s in au.SPLITS
        for p in shard_paths(root, manifest, s)
        for r in pq.read_table(p).to_pylist()
    }


def _batch(records: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in records] for k in records[0]}


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cameras_ring_and_overlap():
    K, R, c = au.camera_model(SIZE)
    assert K.shape == (3, 3) and R.shape == (C, 3, 3) and c[2] == pytest.approx(au.CAMERA_HEIGHT)
    for k in range(C):
        assert np.allclose(R[k].T @ R[k], np.eye(3))  # rotations
        yaw = math.radians(45 * k)
        far = np.array([100 * math.cos(yaw), 100 * math.sin(yaw), au.CAMERA_HEIGHT])
        u, v, z = au.project(far, k, SIZE)
        # on the optical axis's column, above the centre row (the cameras pitch down)
        assert u == pytest.approx(SIZE[1] / 2) and z > 0 and v < SIZE[0] / 2
    # 22.5 degrees (a seam) is seen by cameras 0 and 1: the views overlap
    seam = np.array([20 * math.cos(math.radians(22.5)), 20 * math.sin(math.radians(22.5)), 1.0])
    for k in (0, 1):
        u, v, z = au.project(seam, k, SIZE)
        assert 0 < u < SIZE[1] and 0 < v < SIZE[0] and z > 0
    assert au.project(seam, 0, SIZE)[0] < 16 and au.project(seam, 1, SIZE)[0] > SIZE[1] - 16


@pytest.mark.timeout(30)
def test_boxes_are_the_projected_cuboids():
    checked = whole = 0
    for scene, out in _scenes(16):
        per_cam = {}
        for b in out["boxes"]:
            per_cam.setdefault(b[0], []).append(b)
        for cam, boxes in per_cam.items():
            cam_objs = np.unique(out["instance"][cam][out["instance"][cam] > 0])
            for k, label, x1, y1, x2, y2, j in boxes:
                obj = scene.objects[j]
                assert label == obj.label
                assert 0 <= x1 < x2 <= SIZE[1] and 0 <= y1 < y2 <= SIZE[0]
                uvz = au.project(obj.corners(), k, SIZE)
                if (uvz[:, 2] <= 0.1).any() or len(cam_objs) != 1:
                    continue  # behind the camera or maybe occluded: the box is only the visible part
                # alone in the camera: the box is the corners' bounding box (clipped to the image)
                # minus thin slivers at the silhouette's tips that cover no pixel centre
                lo = np.clip(uvz[:, :2].min(0), 0, (SIZE[1], SIZE[0]))
                hi = np.clip(uvz[:, :2].max(0), 0, (SIZE[1], SIZE[0]))
                assert (np.array([x1, y1]) >= lo - 0.5).all() and (np.array([x2, y2]) <= hi + 0.5).all()
                if np.array_equal(lo, uvz[:, :2].min(0)) and np.array_equal(hi, uvz[:, :2].max(0)):
                    assert (x2 - x1) * (y2 - y1) / np.prod(hi - lo) > 0.75  # wholly in view: near-equal
                    whole += 1
                in_box = (
                    (uvz[:, 0] >= x1 - 1)
                    & (uvz[:, 0] <= x2 + 1)
                    & (uvz[:, 1] >= y1 - 1)
                    & (uvz[:, 1] <= y2 + 1)
                )
                assert in_box.any()  # a projected corner lands in its box
                checked += 1
    assert checked >= 10 and whole >= 5


@pytest.mark.timeout(30)
def test_ground_depth_is_analytic_and_png_round_trip():
    K, R, c = au.camera_model(SIZE)
    (_, out), record = next(_scenes(1, seed=4)), _records(1, seed=4)[0]
    vv, uu = np.mgrid[0 : SIZE[0], 0 : SIZE[1]] + 0.5
    ray_c = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], -1)
    for k in range(C):
        down = -(ray_c @ R[k].T)[..., 2]  # ego-frame z of the ray with unit camera depth
        ground = out["instance"][k] == 0
        with np.errstate(divide="ignore"):
            expect = np.where(down > 0, c[2] / down, 0)
        expect = np.where(expect <= au.MAX_DEPTH, expect, 0)
        assert np.allclose(out["depth"][k][ground], expect[ground], atol=1e-4)
        assert (out["depth"][k][out["instance"][k] < 0] == 0).all()  # sky: no depth
        assert (out["depth"][k][out["instance"][k] > 0] > 0).all()
        stored = au.decode_depth_png(record["depths"][k])
        assert np.abs(stored - out["depth"][k]).max() <= 0.0005 + 1e-6  # millimetre PNG
    assert out["depth"].max() <= au.MAX_DEPTH
    rgb = np.asarray(Image.open(io.BytesIO(record["images"][0])))
    assert rgb.shape == (*SIZE, 3) and np.array_equal(rgb, out["image"][0])


@pytest.mark.timeout(60)
def test_cross_camera_objects_and_label_statistics():
    spanning, boxes_per_cam, exists = 0, [], []
    for _scene, out in _scenes(40, seed=1):
        cams_of = {}
        for b in out["boxes"]:
            cams_of.setdefault(b[6], set()).add(b[0])
        spanning += any(len(cs) >= 2 for cs in cams_of.values())
        counts = np.bincount([b[0] for b in out["boxes"]], minlength=C)
        assert counts.max() <= MAX_BOXES
        boxes_per_cam.append(counts)
        exists.append(out["lane_exists"])
    assert spanning / 40 >= 0.4  # fusion across cameras has something to learn
    assert 0.4 < np.mean(boxes_per_cam) < 3
    rate = np.mean(exists, axis=0)  # [8, L]
    assert rate[0].min() > 0.9 and rate[4].min() > 0.9  # front and rear cameras see every line
    assert 0 < rate.mean() < 1


@pytest.mark.timeout(30)
def test_lanes_lie_on_the_painted_lines_and_converge():
    K, R, c = au.camera_model(SIZE)
    for scene, out in _scenes(6, seed=2):
        lanes, exists = out["lanes"], out["lane_exists"]
        assert lanes.shape == (C, LANES, POINTS, 2) and exists.shape == (C, LANES)
        assert (lanes[~exists] == 0).all()
        normal = np.array([-math.sin(scene.heading), math.cos(scene.heading), 0])
        for k, slot in zip(*np.nonzero(exists), strict=True):
            pts = lanes[k, slot]
            assert (pts >= 0).all() and (pts[:, 0] <= SIZE[1]).all() and (pts[:, 1] <= SIZE[0]).all()
            # back onto the ground: every point sits on the line's lateral offset
            ray = np.stack(
                [(pts[:, 0] - K[0, 2]) / K[0, 0], (pts[:, 1] - K[1, 2]) / K[1, 1], np.ones(POINTS)], -1
            )
            d = ray @ R[k].T
            ground = c + (c[2] / -d[:, 2])[:, None] * d
            lateral = ground @ normal + scene.lateral
            assert np.allclose(lateral, scene.lane_offsets[slot], atol=1e-3)
            along = ground @ np.array([math.cos(scene.heading), math.sin(scene.heading), 0])
            assert np.allclose(np.diff(along), np.diff(along)[0], atol=1e-3)  # even spacing in 3D
        # front camera: lines run up towards one vanishing point (the road direction's image)
        road = np.array([math.cos(scene.heading), math.sin(scene.heading), 0.0])
        vp = K @ (R[0].T @ road)
        vp = vp[:2] / vp[2]
        front = lanes[0][exists[0]]
        assert len(front) >= 2
        assert (np.diff(front[:, :, 1], axis=1) < 0).all()  # near to far: rising in the image
        for pts in front:
            (u0, v0), (u1, v1) = pts[0], pts[-1]
            dist = abs((u1 - u0) * (vp[1] - v0) - (v1 - v0) * (vp[0] - u0)) / math.hypot(u1 - u0, v1 - v0)
            assert dist < 0.05
        spread_near, spread_far = np.ptp(front[:, 0, 0]), np.ptp(front[:, -1, 0])
        assert spread_far < spread_near
        assert (front[:, -1, 1] > vp[1]).all() and (front[:, -1, 1] - vp[1] < 4).all()


@pytest.mark.timeout(30)
def test_generate_is_deterministic():
    a, b = _records(3, seed=9), _records(3, seed=9)
    assert a == b
    assert [r["sample_id"] for r in a] == ["synth_000000", "synth_000001", "synth_000002"]
    assert _records(1, seed=10)[0]["images"] != a[0]["images"]
    r = a[0]
    assert len(r["images"]) == len(r["depths"]) == C and (r["height"], r["width"]) == SIZE
    assert len(r["lanes"]) == C * LANES * POINTS * 2 and len(r["lane_exists"]) == C * LANES
    assert set(r["boxes"][0]) == {"camera", "label", "x1", "y1", "x2", "y2"}


@pytest.mark.timeout(30)
def test_depth_png_round_trip():
    depth = np.random.default_rng(0).uniform(0, 60, (5, 7)).astype(np.float32)
    depth[0, 0] = 0
    back = au.decode_depth_png(au.encode_depth_png(depth))
    assert back.dtype == np.float32 and back[0, 0] == 0
    assert np.abs(back - depth).max() <= 0.0005 + 1e-6
    assert Image.open(io.BytesIO(au.encode_depth_png(depth))).mode.startswith("I;16")


# --- prepare, statistics ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prepare_is_idempotent_and_writes_stats(tmp_path):
    m = _prepare(tmp_path)
    meta = m["meta"]
    assert m["task"] == "autonomous" and meta["classes"] == list(au.CLASSES) and meta["num_cameras"] == 8
    assert meta["image_size"] == list(SIZE) and meta["skipped_samples"] == []
    assert sum(m["splits"][s]["rows"] for s in au.SPLITS) == 24 and m["splits"]["train"]["rows"] > 5
    rows = _rows(tmp_path, m)
    boxes = sum(len(r["boxes"]) for r in rows.values())
    assert sum(sum(c.values()) for c in meta["box_counts"].values()) == boxes
    verify(tmp_path, m, check_hash=True)

    stats = au.train_statistics(tmp_path)
    assert stats["mean_depth"].shape == (C, *SIZE) and stats["mean_depth"].dtype == np.float32
    assert stats["mean_lanes"].shape == (C, LANES, POINTS, 2) and stats["mean_lanes"].dtype == np.float32
    assert stats["lane_exists_rate"].shape == (C, LANES)
    assert (stats["mean_depth"][:, 0] == 0).all() and (stats["mean_depth"][:, -1] > 0).all()  # sky / ground
    train = [
        r for p in shard_paths(tmp_path, m, "train") for r in pq.read_table(p).to_pylist()
    ]  # recompute two statistics by hand
    ex = np.array([r["lane_exists"] for r in train]).reshape(-1, C, LANES)
    assert np.allclose(stats["lane_exists_rate"], ex.mean(0))
    lanes = np.array([r["lanes"] for r in train]).reshape(-1, C, LANES, POINTS, 2) / (SIZE[1], SIZE[0])
    k, s = np.argwhere(ex.all(0))[0]
    assert np.allclose(stats["mean_lanes"][k, s], lanes[:, k, s].mean(0), atol=1e-5)
    assert stats["mean_lanes"].min() >= 0 and stats["mean_lanes"].max() <= 1

    mtime = os.path.getmtime(tmp_path / "manifest.json")
    assert _prepare(tmp_path) == m and os.path.getmtime(tmp_path / "manifest.json") == mtime
    os.remove(tmp_path / au.STATS_FILE)
    with pytest.raises(DataError, match="no training statistics at .*stats.npz"):
        _prepare(tmp_path)
    assert _prepare(tmp_path, seed=1)["fingerprint"] != m["fingerprint"]  # other arguments: regenerated
    with pytest.raises(DataError, match="unknown data source 'lidar'"):
        _prepare(tmp_path, source="lidar")


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_decode_batch_shapes_dtypes_and_augment():
    recs = _records(3, seed=5)
    batch = _batch(recs)
    out = au.decode_batch(batch, SIZE, MAX_BOXES, LANES, POINTS, augment=False)
    H, W = SIZE
    want = {
        "sample_id": ((3,), object),
        "images": ((3, C, 3, H, W), np.uint8),  # normalised on the model's device
        "depth": ((3, C, H, W), np.float32),
        "boxes": ((3, C, MAX_BOXES, 4), np.float32),
        "box_labels": ((3, C, MAX_BOXES), np.int64),
        "lanes": ((3, C, LANES, POINTS, 2), np.float32),
        "lane_exists": ((3, C, LANES), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in want.items()
    }
    assert list(out["sample_id"]) == [r["sample_id"] for r in recs]
    from jobs import tasks

    x = tasks.get("autonomous").inputs(out, torch.device("cpu"), torch.float32)[0]  # the model's input
    assert abs(float(x.mean())) < 0.5 and 0.6 < float(x.std()) < 1.5  # MEAN/STD fit
    rgbs = [np.asarray(Image.open(io.BytesIO(b))) for b in recs[0]["images"]]
    assert np.array_equal(out["images"][0], au.preprocess_images(rgbs))  # the one shared transform
    assert np.allclose(out["depth"][0, 2], au.decode_depth_png(recs[0]["depths"][2]))
    # boxes: normalised, labels match, padding
    b0 = [b for b in recs[0]["boxes"] if b["camera"] == recs[0]["boxes"][0]["camera"]]
    cam = b0[0]["camera"]
    got = out["boxes"][0, cam, : len(b0)]
    assert np.allclose(got, [[b["x1"] / W, b["y1"] / H, b["x2"] / W, b["y2"] / H] for b in b0])
    assert list(out["box_labels"][0, cam, : len(b0)]) == [b["label"] for b in b0]
    valid = out["box_labels"] >= 0
    assert (out["boxes"][~valid] == 0).all() and (out["box_labels"][~valid] == -1).all()
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 1
    lanes = np.asarray(recs[1]["lanes"]).reshape(C, LANES, POINTS, 2) / (W, H)
    assert np.allclose(out["lanes"][1], lanes) and set(np.unique(out["lane_exists"])) <= {0.0, 1.0}
    # augmentation: colours only, deterministic per seed, geometry untouched
    aug = au.decode_batch(batch, SIZE, MAX_BOXES, LANES, POINTS, augment=True, seed=1)
    again = au.decode_batch(batch, SIZE, MAX_BOXES, LANES, POINTS, augment=True, seed=1)
    assert np.array_equal(aug["images"], again["images"]) and not np.array_equal(aug["images"], out["images"])
    for key in ("depth", "boxes", "box_labels", "lanes", "lane_exists"):
        assert np.array_equal(aug[key], out[key])
    with pytest.raises(DataError, match="synth_000000"):
        au.decode_batch(batch, (40, 64), MAX_BOXES, LANES, POINTS, augment=False)
    broken = {**batch, "images": [[b"junk"] * C, *batch["images"][1:]]}
    with pytest.raises(DataError, match="cannot decode images of sample synth_000000"):
        au.decode_batch(broken, SIZE, MAX_BOXES, LANES, POINTS, augment=False)


@pytest.mark.timeout(30)
def test_decode_keeps_the_largest_boxes():
    rec = dict(_records(1)[0])
    rec["boxes"] = [
        {"camera": 3, "label": 0, "x1": 0.0, "y1": 0.0, "x2": 4.0, "y2": 4.0},
        {"camera": 3, "label": 1, "x1": 0.0, "y1": 0.0, "x2": 40.0, "y2": 30.0},
        {"camera": 3, "label": 2, "x1": 10.0, "y1": 10.0, "x2": 20.0, "y2": 20.0},
    ]
    out = au.decode_batch(_batch([rec]), SIZE, 2, LANES, POINTS, augment=False)
    assert list(out["box_labels"][0, 3]) == [1, 2]
    assert np.allclose(out["boxes"][0, 3, 0], [0, 0, 40 / 64, 30 / 48])
    assert (out["box_labels"][0, :3] == -1).all()


@pytest.mark.timeout(30)
def test_preprocess_images_rejects_bad_rigs():
    ok = [np.zeros((*SIZE, 3), np.uint8)] * C
    assert au.preprocess_images(ok, SIZE).shape == (C, 3, *SIZE)
    with pytest.raises(DataError, match="expected 8 camera images, got 7"):
        au.preprocess_images(ok[:7])
    with pytest.raises(DataError, match="camera 5 image is 40x64"):
        au.preprocess_images(ok[:5] + [np.zeros((40, 64, 3), np.uint8)] + ok[6:])
    with pytest.raises(DataError, match="expected 48x64"):
        au.preprocess_images([np.zeros((40, 64, 3), np.uint8)] * C, SIZE)
    with pytest.raises(DataError, match="uint8 H x W x 3"):
        au.preprocess_images([np.zeros(SIZE, np.uint8)] * C)


# --- rig folders ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_export_then_import_reproduces_the_synthetic_data(tmp_path):
    synth = _prepare(tmp_path / "synth", num_samples=12)
    assert au.export_rig(au.generate(12, SIZE, 0, MAX_BOXES, LANES, POINTS), tmp_path / "rig") == 12
    assert sorted(os.listdir(tmp_path / "rig" / "synth_000000")) == sorted(
        [f"cam{k}.png" for k in range(C)] + [f"depth{k}.png" for k in range(C)] + ["annotations.json"]
    )
    ann = json.loads((tmp_path / "rig" / "synth_000000" / "annotations.json").read_text())
    assert len(ann["cameras"]) == C and {"boxes", "lanes"} == set(ann["cameras"][0])
    rig = _prepare(tmp_path / "imported", source="rig", import_path=str(tmp_path / "rig"), num_samples=0)
    assert rig["meta"]["source"] == "rig" and rig["meta"]["box_counts"] == synth["meta"]["box_counts"]
    assert {s: rig["splits"][s]["rows"] for s in au.SPLITS} == {
        s: synth["splits"][s]["rows"] for s in au.SPLITS
    }
    a, b = _rows(tmp_path / "synth", synth), _rows(tmp_path / "imported", rig)
    assert a.keys() == b.keys()
    for sid, ra in a.items():
        rb = b[sid]
        assert ra["boxes"] == rb["boxes"] and ra["lane_exists"] == rb["lane_exists"]
        assert np.abs(np.subtract(ra["lanes"], rb["lanes"])).max() < 1.0
        for k in range(C):
            assert np.array_equal(au.decode_depth_png(ra["depths"][k]), au.decode_depth_png(rb["depths"][k]))
            assert np.array_equal(
                np.asarray(Image.open(io.BytesIO(ra["images"][k]))),
                np.asarray(Image.open(io.BytesIO(rb["images"][k]))),
            )
    sa, sb = au.train_statistics(tmp_path / "synth"), au.train_statistics(tmp_path / "imported")
    assert all(np.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    # the same rig again: reused; a changed rig: imported again
    assert (
        _prepare(tmp_path / "imported", source="rig", import_path=str(tmp_path / "rig"), num_samples=0) == rig
    )
    (tmp_path / "rig" / "synth_000000" / "annotations.json").write_text(
        json.dumps({"cameras": ann["cameras"]}) + " "
    )
    again = _prepare(tmp_path / "imported", source="rig", import_path=str(tmp_path / "rig"), num_samples=0)
    assert again["meta"]["import_fingerprint"] != rig["meta"]["import_fingerprint"]


@pytest.fixture
def rig(tmp_path):
    path = tmp_path / "rig"
    au.export_rig(au.generate(2, SIZE, 3, MAX_BOXES, LANES, POINTS), path)
    return path


def _edit_annotations(sample_dir, fn) -> None:
    ann = json.loads((sample_dir / "annotations.json").read_text())
    fn(ann["cameras"])
    (sample_dir / "annotations.json").write_text(json.dumps(ann))


def _png(path, size, mode="RGB") -> None:
    Image.new(mode, (size[1], size[0])).save(path)


BAD_SAMPLES = {
    "missing camera": (lambda d: os.remove(d / "cam7.png"), "expected 8 camera images"),
    "ninth camera": (lambda d: _png(d / "cam8.png", SIZE), "expected 8 camera images"),
    "7 annotation entries": (lambda d: _edit_annotations(d, lambda cams: cams.pop()), "must list 8 cameras"),
    "mismatched image sizes": (lambda d: _png(d / "cam3.png", (40, 64)), r"cam3.png is 40x64 \(HxW\) but cam0.png is 48x64"),
    "depth size": (lambda d: _png(d / "depth2.png", (40, 64), "I;16"), "depth2.png is 40x64"),
    "unreadable image": (lambda d: (d / "cam1.png").write_bytes(b"\x89PNG broken"), "cannot read cam1.png"),
    "box outside": (
        lambda d: _edit_annotations(d, lambda cams: cams[2]["boxes"].append({"label": "car", "xyxy": [0, 0, 70, 10]})),
        "camera 2: box .* lies outside the 64x48",
    ),
    "empty box": (
        lambda d: _edit_annotations(d, lambda cams: cams[0]["boxes"].append({"label": "car", "xyxy": [5, 5, 5, 9]})),
        "camera 0: empty box",
    ),
    "unknown label": (
        lambda d: _edit_annotations(d, lambda cams: cams[4]["boxes"].append({"label": "bus", "xyxy": [1, 1, 9, 9]})),
        "camera 4: unknown class label 'bus'",
    ),
    "lane slot": (
        lambda d: _edit_annotations(d, lambda cams: cams[0]["lanes"].append({"slot": LANES, "points": [[1, 1], [2, 2]]})),
        f"camera 0: lane slot {LANES} is not in 0..{LANES - 1}",
    ),
}  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_importer_names_the_bad_sample(rig, case):
    damage, message = BAD_SAMPLES[case]
    damage(rig / "synth_000001")
    records = au.import_rig(str(rig), SIZE, LANES, POINTS)
    assert next(records)["sample_id"] == "synth_000000"
    with pytest.raises(DataError, match=rf"bad rig sample synth_000001 .*{message}") as err:
        next(records)
    assert "\n" not in str(err.value)
    skipped: list[str] = []
    kept = list(au.import_rig(str(rig), SIZE, LANES, POINTS, on_bad_sample="skip", skipped=skipped))
    assert [r["sample_id"] for r in kept] == ["synth_000000"] and skipped == ["synth_000001"]


@pytest.mark.timeout(30)
def test_importer_checks_the_dataset_size_and_path(rig, tmp_path):
    with pytest.raises(
        DataError, match=r"bad rig sample synth_000000 .*cam0.png is 48x64 \(HxW\), the dataset's"
    ):
        next(au.import_rig(str(rig), (40, 64), LANES, POINTS))
    with pytest.raises(DataError, match="rig path not found"):
        next(au.import_rig(str(tmp_path / "nope"), SIZE, LANES, POINTS))
    with pytest.raises(DataError, match="needs an import path"):
        _prepare(tmp_path / "d", source="rig")


@pytest.mark.timeout(30)
def test_import_resamples_lanes_and_optional_depth(rig):
    d = rig / "synth_000000"

    def lanes(cams):
        cams[0]["lanes"] = [{"slot": 1, "points": [[0, 40], [6, 34], [40, 0]]}]  # straight, uneven

    _edit_annotations(d, lanes)
    os.remove(d / "depth5.png")
    r = next(au.import_rig(str(rig), SIZE, LANES, POINTS))
    pts = np.asarray(r["lanes"]).reshape(C, LANES, POINTS, 2)[0, 1]
    assert np.asarray(r["lane_exists"]).reshape(C, LANES)[0].tolist() == [False, True, False, False]
    assert np.allclose(pts[0], [0, 40]) and np.allclose(pts[-1], [40, 0])
    step = np.hypot(*np.diff(pts, axis=0).T)
    assert np.allclose(step, step[0], atol=1e-3)  # even spacing by arc length in the image
    assert (au.decode_depth_png(r["depths"][5]) == 0).all() and (
        au.decode_depth_png(r["depths"][4]) > 0
    ).any()


@pytest.mark.timeout(60)
def test_prepare_rig_skips_and_counts(rig, tmp_path, capsys):
    (rig / "synth_000001" / "cam2.png").write_bytes(b"not a png")
    m = _prepare(tmp_path / "d", source="rig", import_path=str(rig), on_bad_sample="skip", num_samples=0)
    assert m["meta"]["skipped_samples"] == ["synth_000001"]
    assert sum(m["splits"][s]["rows"] for s in au.SPLITS) == 1
    assert "skipped 1 bad rig sample(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="bad rig sample synth_000001 .*cannot read cam2.png"):
        _prepare(tmp_path / "e", source="rig", import_path=str(rig), on_bad_sample="fail", num_samples=0)


# --- readers and plots ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_iter_split_numpy_batches_in_file_order(tmp_path):
    m = _prepare(tmp_path)
    rows = m["splits"]["train"]["rows"]
    batches = list(au.iter_split_numpy(tmp_path, "train", 4, SIZE, MAX_BOXES, LANES, POINTS))
    assert [len(b["sample_id"]) for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert sum(len(b["sample_id"]) for b in batches) == rows and rows > 5  # spans several shards
    ids = [
        i for p in shard_paths(tmp_path, m, "train") for i in pq.read_table(p).column("sample_id").to_pylist()
    ]
    assert [i for b in batches for i in b["sample_id"]] == ids
    assert batches[0]["images"].shape == (4, C, 3, *SIZE) and batches[0]["box_labels"].dtype == np.int64


@pytest.mark.timeout(120)
def test_read_split_with_ray(tmp_path, ray_local):
    m = _prepare(tmp_path)
    ds = au.read_split(tmp_path, "train", SIZE, MAX_BOXES, LANES, POINTS, augment=True, manifest=m)
    batches = list(ds.iter_batches(batch_size=4, batch_format="numpy"))  # one pass: Ray Data is slow to start
    b = batches[0]
    assert set(b) == {"sample_id", "images", "depth", "boxes", "box_labels", "lanes", "lane_exists"}
    assert b["images"].shape == (4, C, 3, *SIZE) and b["images"].dtype == np.uint8
    assert b["depth"].shape == (4, C, *SIZE) and b["boxes"].shape == (4, C, MAX_BOXES, 4)
    assert b["box_labels"].dtype == np.int64 and b["lanes"].shape == (4, C, LANES, POINTS, 2)
    assert sum(len(x["sample_id"]) for x in batches) == m["splits"]["train"]["rows"]
    path = tmp_path / m["splits"]["train"]["shards"][0]["path"]
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"corrupt Parquet shard .*train/part-00000\.parquet"):
        au.read_split(tmp_path, "train", SIZE, MAX_BOXES, LANES, POINTS, augment=False, manifest=m)


@pytest.mark.timeout(60)
def test_plot_sample_writes_a_contact_sheet(tmp_path):
    recs = _records(2)
    assert au.plot_sample(recs[0], tmp_path / "record.png") == str(tmp_path / "record.png")
    batch = au.decode_batch(_batch(recs), SIZE, MAX_BOXES, LANES, POINTS, augment=False)
    row = {k: v[1] for k, v in batch.items()}
    au.plot_sample(row, tmp_path / "row.png")
    au.plot_sample(batch, tmp_path / "batch.png")
    for name in ("record.png", "row.png", "batch.png"):
        img = Image.open(tmp_path / name)
        assert img.format == "PNG" and img.width > 400
