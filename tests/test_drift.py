"""Drift reference and PSI (jobs.drift), each task's drift features, the reference export writes
into the model card, and the files an export carries into the registry. No Ray, no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import drift

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def recipe(task: str, root: Path, *overrides: str):
    from jobs.config import load_recipe

    return load_recipe(CONFIGS / f"{task}.yaml", "tiny", [f"data.root={root}", *overrides])


def fake_checkpoint(model: torch.nn.Module, path: Path, tag: str = "final") -> Path:
    """A ZeRO-0 DeepSpeed checkpoint as export reads it: rank 0's module state and the config
    that names its stage (DeepSpeed's model-states file carries both)."""
    (path / tag).mkdir(parents=True)
    states = {"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}}
    torch.save(states, path / tag / "mp_rank_00_model_states.pt")
    return path


@pytest.mark.timeout(30)
def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = drift.reference({"x": rng.normal(size=2048)})
    assert len(ref["x"]["edges"]) == 9 and len(ref["x"]["expected"]) == 19
    assert sum(ref["x"]["expected"]) == pytest.approx(1.0)
    assert ref["x"]["rows"] == 2048 and abs(ref["x"]["mean"]) < 0.1 and abs(ref["x"]["std"] - 1) < 0.1
    same = drift.psi(ref["x"], rng.normal(size=500))
    assert same < 0.05
    assert drift.psi(ref["x"], rng.normal(0.5, 1.0, size=500)) > 0.25  # mean moved half a std
    assert drift.psi(ref["x"], rng.normal(0.0, 2.0, size=500)) > 0.25  # spread doubled
    # NaN/inf are dropped, not binned; scores() covers the features present in both
    assert drift.psi(ref["x"], np.r_[rng.normal(size=500), np.nan, np.inf]) < 0.05
    assert set(drift.scores(ref, {"x": rng.normal(size=300), "unknown": np.ones(3)})) == {"x"}
    with pytest.raises(ValueError, match="no finite values"):
        drift.psi(ref["x"], np.array([np.nan]))


@pytest.mark.timeout(30)
def test_discrete_tied_and_constant_features_get_a_bin_per_value():
    rng = np.random.default_rng(1)
    ref = drift.reference(
        {
            "category": rng.integers(0, 5, 2000),
            "mostly_zero": np.where(rng.random(2000) < 0.7, 0.0, rng.random(2000)),
            "constant": np.full(2000, 3.0),
            "small": rng.normal(size=60),
        }
    )
    json.dumps(ref)  # plain floats and lists: it goes into the model card
    assert ref["category"]["edges"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert drift.psi(ref["category"], rng.integers(0, 5, 500)) < 0.05
    assert drift.psi(ref["category"], rng.integers(0, 2, 500)) > 0.25  # a new mix
    assert drift.psi(ref["category"], rng.integers(5, 7, 500)) > 0.25  # unseen values
    assert ref["mostly_zero"]["edges"][0] == 0.0
    assert drift.psi(ref["mostly_zero"], np.where(rng.random(500) < 0.7, 0.0, rng.random(500))) < 0.05
    assert drift.psi(ref["mostly_zero"], rng.random(500)) > 0.25
    # a constant reference: a move either way is drift, the constant itself is not
    assert drift.psi(ref["constant"], np.full(100, 3.0)) == 0.0
    assert (
        drift.psi(ref["constant"], np.full(100, 2.0)) > 1
        and drift.psi(ref["constant"], np.full(100, 4.0)) > 1
    )
    # 60 rows: 3 bins (MIN_BIN_ROWS each), not 10 noisy ones
    assert len(ref["small"]["edges"]) == 2


@pytest.mark.timeout(30)
def test_drift_window_reports_nothing_until_min_rows_then_the_worst_feature():
    rng = np.random.default_rng(2)
    ref = drift.reference({"a": rng.normal(size=2000), "b": rng.integers(0, 3, 2000)})
    # the card's block is accepted as well as the bare mapping
    window = drift.DriftWindow({"split": "val", "rows": 2000, "features": ref}, window=300, threshold=0.2)
    empty = window.report()
    assert empty == {"score": None, "features": {}, "rows": 0, "threshold": 0.2, "drifted": False}
    window.observe({"a": rng.normal(size=150), "b": rng.integers(0, 3, 150), "ignored": np.zeros(150)})
    assert window.report()["score"] is None and window.report()["rows"] == 150  # < MIN_ROWS
    window.observe({"a": rng.normal(size=150), "b": rng.integers(0, 3, 150)})
    report = window.report()
    assert report["rows"] == 300 and set(report["features"]) == {"a", "b"}
    assert report["score"] == max(report["features"].values()) < 0.2 and not report["drifted"]
    json.dumps(report)
    # the window keeps its last 300 rows: a shifted stream replaces the old one
    window.observe({"a": rng.normal(2.0, 1.0, size=1000), "b": rng.integers(0, 3, 1000)})
    report = window.report()
    assert report["rows"] == 300 and report["drifted"] and report["score"] == report["features"]["a"] > 1
    assert report["features"]["b"] < 0.2
    # a window smaller than MIN_ROWS reports once it is full
    small = drift.DriftWindow(ref, window=50)
    small.observe({"a": rng.normal(size=50), "b": rng.integers(0, 3, 50)})
    assert small.report()["score"] is not None


def _observe_split(window, task, model, root, split, spec, transform=None):
    with torch.no_grad():
        for batch in task.iter_split(root, split, 64, **spec):
            if transform is not None:
                batch = {**batch, "image": transform(batch["image"])}
            x = task.inputs(batch, torch.device("cpu"), torch.float32)
            window.observe(task.drift_features(x, model(*x)))


@pytest.mark.timeout(300)
def test_retinopathy_reference_flags_brightness_but_not_the_test_split(tiny_data):
    import models
    from jobs import tasks
    from jobs.export import reference_for

    task, r = tasks.get("retinopathy"), recipe("retinopathy", tiny_data)
    torch.manual_seed(0)
    model = models.build("retinopathy", "tiny", **task.model_kwargs(r))
    spec = task.input_spec(r)
    ref = reference_for(model, "retinopathy", tiny_data, spec)
    assert model.training  # its mode is restored
    assert ref["split"] == "val" and ref["rows"] > 200
    # batches shorter than the stride (an imported day's last rows): every stride-th row still
    small = reference_for(model, "retinopathy", tiny_data, spec, max_rows=20, batch_size=3)
    total = json.loads((tiny_data / "manifest.json").read_text())["splits"]["val"]["rows"]
    assert small["rows"] == min(20, len(range(0, total, -(-total // 20))))
    names = {"image_mean", "image_std", "red_mean", "green_mean", "blue_mean", "referable_prob", "confidence"}
    assert set(ref["features"]) == names
    assert all(f["rows"] == ref["rows"] for f in ref["features"].values())
    model.eval()
    # the test split: other patients, same distribution
    same = drift.DriftWindow(ref, window=10_000)
    _observe_split(same, task, model, tiny_data, "test", spec)
    assert same.report()["score"] < 0.2, same.report()
    # the val images 25% darker, as from an under-exposing camera
    darker = drift.DriftWindow(ref, window=10_000)
    _observe_split(darker, task, model, tiny_data, "val", spec, lambda x: (x * 0.75).astype(x.dtype))
    report = darker.report()
    assert report["drifted"] and report["features"]["image_mean"] > 0.2, report
    # no such split (or no data at all): no reference, serving reports drift as unavailable
    assert reference_for(model, "retinopathy", tiny_data, spec, split="holdout") is None
    assert reference_for(model, "retinopathy", tiny_data.parent / "nothing", spec) is None


@pytest.mark.timeout(300)
def test_export_keeps_the_reference_in_the_card(tiny_data, tmp_path):
    from jobs import tasks
    from jobs.export import CARD, WEIGHTS, export, load_exported

    r = recipe("retinopathy", tiny_data, "train.zero_stage=0")
    ckpt = fake_checkpoint(tasks.build_model(r), tmp_path / "ckpt")
    out = export(ckpt, r, tmp_path / "model", tag="final", metrics={"kappa": 0.0})
    card = json.loads((out / CARD).read_text())
    ref = card["reference"]
    assert ref["split"] == "val" and ref["rows"] > 200 and "referable_prob" in ref["features"]
    assert set(ref["features"]["image_mean"]) == {"edges", "expected", "rows", "mean", "std"}
    assert {p.name for p in out.iterdir()} == {CARD, WEIGHTS}  # nothing else to carry
    model, loaded = load_exported(out)
    assert loaded["reference"] == ref and not model.training


@pytest.mark.timeout(300)
def test_recsys_export_carries_its_catalogue_into_the_registry(tmp_path):
    from pyarrow import fs

    from data_loaders.recsys import TRACKS_FILE, load_catalogue
    from jobs import tasks
    from jobs.export import CARD, WEIGHTS, export
    from jobs.registry import STAGE, Registry

    r = recipe("recsys", tmp_path / "data", "train.zero_stage=0")
    task = tasks.get("recsys")
    task.prepare(r)
    ckpt = fake_checkpoint(tasks.build_model(r), tmp_path / "ckpt")
    out = export(ckpt, r, tmp_path / "model", tag="final", metrics={"auc": 0.5})
    assert (out / TRACKS_FILE).read_bytes() == (tmp_path / "data" / TRACKS_FILE).read_bytes()
    assert load_catalogue(str(out)).size == load_catalogue(str(tmp_path / "data")).size
    card = json.loads((out / CARD).read_text())
    assert set(card["reference"]["features"]) == {
        "play_prob", "history_length", "history_skip_rate", "candidate_popularity", "context_type", "premium",
    }  # fmt: skip
    assert set(card["reference"]["features"]["premium"]["edges"]) <= {0.0, 1.0}

    registry = Registry(tmp_path / "registry")
    entry = registry.register(out, test_metrics={"auc": 0.5}, lineage={"run": "test"})
    version = tmp_path / "registry" / "recsys" / entry["version"]
    assert sorted(p.name for p in version.iterdir()) == sorted([CARD, WEIGHTS, TRACKS_FILE, STAGE])
    assert load_catalogue(str(registry.fetch("recsys", stage="candidate"))).size > 1

    # a registry behind a non-local filesystem: fetch copies every file, and completes a cache
    # that lacks one (cut short, or fetched before the file was carried)
    remote = Registry(tmp_path / "registry")
    remote.fs, remote.root = fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem()), "registry"
    cache = tmp_path / "cache"
    local = remote.fetch("recsys", stage="candidate", cache=cache)
    assert {p.name for p in local.iterdir()} == {CARD, WEIGHTS, TRACKS_FILE}
    (local / TRACKS_FILE).unlink()
    assert (remote.fetch("recsys", stage="candidate", cache=cache) / TRACKS_FILE).is_file()


@pytest.mark.timeout(60)
def test_registry_copies_every_file_of_an_exported_folder(tmp_path):
    from jobs.export import CARD, WEIGHTS
    from jobs.registry import Registry

    model = tmp_path / "model"
    (model / "extra").mkdir(parents=True)
    (model / CARD).write_text(json.dumps({"task": "recsys", "lineage": {"run": "r"}}))
    (model / WEIGHTS).write_bytes(b"weights")
    (model / "tracks.parquet").write_bytes(b"catalogue")
    (model / "extra" / "vocab.txt").write_text("a\n")
    entry = Registry(tmp_path / "registry").register(model, test_metrics={}, lineage={})
    version = tmp_path / "registry" / "recsys" / entry["version"]
    assert (version / "tracks.parquet").read_bytes() == b"catalogue"
    assert (version / "extra" / "vocab.txt").read_text() == "a\n"
    assert json.loads((version / CARD).read_text())["test_metrics"] == {}


@pytest.mark.timeout(120)
def test_autonomous_drift_features_per_rig():
    import models
    from jobs import tasks

    task = tasks.get("autonomous")
    torch.manual_seed(0)
    model = models.build("autonomous", "tiny", num_lanes=4, lane_points=8).eval()
    images = torch.randn(2, 8, 3, 64, 96)
    with torch.no_grad():
        features = task.drift_features((images,), model(images))
    assert set(features) == {"image_mean", "image_std", "depth_mean", "detections", "lane_prob"}
    for name, v in features.items():
        assert v.shape == (2,) and v.dtype == np.float64 and np.isfinite(v).all(), name
    assert features["image_mean"] == pytest.approx(images.double().mean(dim=(1, 2, 3, 4)).numpy())
    assert ((features["detections"] >= 0) & (features["detections"] <= 8 * model.queries)).all()
    assert ((features["lane_prob"] > 0) & (features["lane_prob"] < 1)).all()
