"""The autonomous task through the one engine: learns boxes, lanes and depth; resumes; exports;
the full flavour builds at the seed's scale; a broken rig gets one line naming the sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, native_dtype
from tests.test_cli import deepfleet, one_line_error

RECIPE = CONFIGS / "autonomous.yaml"


def _recipe(root: Path, out: Path, *sets: str, name: str | None = None):
    from jobs.config import load_recipe

    extra = [f"data.root={root}", f"run.output_dir={out}"] + ([f"run.name={name}"] if name else [])
    return load_recipe(RECIPE, "tiny", [*extra, *sets])


def _data_root(summary: dict) -> str:
    return json.loads((Path(summary["paths"]["model"]) / "model_card.json").read_text())["config"]["data"][
        "root"
    ]


@pytest.fixture
def auto_run(autonomous_run) -> dict:
    """The tiny recipe's run as it ships, trained once per session (conftest)."""
    return autonomous_run


@pytest.mark.timeout(1500)  # includes the session fixture: the whole tiny fit
def test_tiny_recipe_beats_every_baseline(auto_run):
    s, base = auto_run["metrics"], auto_run["baseline"]
    # the bars: depth and lanes at most half the trivial predictor's error, mAP@0.5 >= 0.25
    assert s["depth_absrel"] <= 0.5 * base["depth_absrel"], (s, base)
    assert s["lane_error"] <= 0.5 * base["lane_error"], (s, base)
    assert s["box_map50"] >= 0.25 and base["box_map50"] == 0.0, s
    assert s["depth_delta1"] > base["depth_delta1"]
    assert auto_run["world_size"] == 2 and auto_run["zero_stage"] == 2 and auto_run["task"] == "autonomous"
    assert auto_run["dtype"] == native_dtype()  # the bars above hold in bf16 (conftest)
    for key in ("checkpoint", "model", "wandb"):
        assert Path(auto_run["paths"][key]).exists(), key
    card = json.loads((Path(auto_run["paths"]["model"]) / "model_card.json").read_text())
    assert card["input"] == {
        "image_size": [64, 96],
        "num_cameras": 8,
        "max_boxes": 6,
        "num_lanes": 4,
        "lane_points": 8,
    }


@pytest.mark.timeout(300)
def test_export_and_evaluate_reproduce_validation(auto_run, tmp_path):
    from jobs.evaluate import evaluate

    result = evaluate(auto_run["paths"]["model"], _data_root(auto_run), split="val", out_dir=tmp_path)
    assert result["val_rows"] == auto_run["metrics"]["val_rows"]
    # the export computes in fp32; validation ran in the run's dtype (bf16 here, conftest)
    bf16 = auto_run["dtype"] == "bf16"
    for key in ("lane_error", "depth_absrel", "depth_delta1"):
        # bf16 carries ~3 significant digits: validated in bf16, the depth AbsRel of the same
        # weights came out 4-7% away from the fp32 export's in two runs (0.0376 / 0.0392,
        # 0.0385 / 0.0360); fp32 runs reproduce it to 1e-4
        assert result[key] == pytest.approx(auto_run["metrics"][key], rel=0.15 if bf16 else 1e-4), key
    assert result["box_map50"] == pytest.approx(auto_run["metrics"]["box_map50"], abs=3e-2 if bf16 else 2e-3)
    assert Path(result["plots"][0]).stat().st_size > 20_000  # 8 cameras, boxes, lanes, depth


@pytest.mark.timeout(600)
def test_same_name_resumes_through_the_same_engine(auto_run):
    """Starting the finished run again with a longer budget continues from its last checkpoint."""
    from jobs.train import train

    run_dir = Path(auto_run["paths"]["run_dir"])
    steps, epochs = auto_run["steps"], auto_run["epochs"]
    more = (f"train.epochs={epochs + 1}", f"train.max_steps={steps + 4}", "train.log_every=2")
    more = (*more, f"train.dtype={auto_run['dtype']}")  # as the session fixture trained it
    again = train(_recipe(_data_root(auto_run), run_dir.parent, *more, name=run_dir.name))
    assert again["restores"] == [steps] and again["steps"] == steps + 4
    assert again["metrics"]["box_map50"] > 0.1  # the trained weights came back, not a fresh model


@pytest.mark.timeout(300)
def test_full_flavour_at_the_seeds_scale():
    import models

    counts = {}
    for separate in (False, True):
        with torch.device("meta"):
            model = models.build("autonomous", "full", separate_backbones=separate)
        counts[separate] = sum(p.numel() for p in model.parameters())
        assert model.fusion.layers[0].self_attn.embed_dim == 2048 and len(model.fusion.layers) == 6
    # eight ResNet-50s (~23.5M each) instead of one
    assert counts[False] > 400e6 and counts[True] - counts[False] == pytest.approx(7 * 23.5e6, rel=0.02)

    # the shared-backbone full flavour takes one real training step at small resolution on CPU
    from jobs.config import AutonomousLoss
    from jobs.tasks.autonomous import task_loss

    torch.manual_seed(0)
    model = models.build("autonomous", "full", num_lanes=4, lane_points=20)
    images = torch.randn(1, 8, 3, 64, 96)
    target = {
        "boxes": torch.tensor([[0.1, 0.2, 0.4, 0.6]]).expand(1, 8, 1, 4).clone(),
        "box_labels": torch.zeros(1, 8, 1, dtype=torch.long),
        "lanes": torch.rand(1, 8, 4, 20, 2),
        "lane_exists": torch.ones(1, 8, 4),
        "depth": torch.rand(1, 8, 64, 96) * 40 + 1,
    }
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = task_loss(AutonomousLoss(), model(images), target)
    loss.backward()
    before = model.class_head.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.class_head.weight)


@pytest.mark.timeout(120)
def test_zero3_preset_and_convnext_backbone():
    import models
    from jobs.config import load_recipe

    zero3 = load_recipe(RECIPE, "zero3")
    assert zero3.train.zero_stage == 3 and zero3.train.offload == "cpu" and zero3.model.separate_backbones
    model = models.build("autonomous", "convnext", num_lanes=2, lane_points=4)
    out = model.eval()(torch.randn(1, 8, 3, 64, 96))
    assert out["depth"].shape == (1, 8, 64, 96) and out["lanes"].shape == (1, 8, 2, 4, 2)


@pytest.mark.timeout(240)
def test_a_broken_rig_gets_one_line_naming_the_sample(tmp_path):
    from data_loaders import autonomous as au

    rig = tmp_path / "rig"
    au.export_rig(au.generate(3, (64, 96), 0, 6, 4, 8), rig)
    (rig / "synth_000001" / "cam5.png").unlink()
    sets = [
        f"data.root={tmp_path / 'data'}",
        "data.source=rig",
        f"data.import_path={rig}",
        "data.on_bad_sample=fail",
    ]
    args = ["prepare", str(RECIPE), "--profile", "tiny", *[a for s in sets for a in ("--set", s)]]
    line = one_line_error(deepfleet(*args))
    assert "synth_000001" in line and "8 camera images" in line
