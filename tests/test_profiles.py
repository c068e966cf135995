"""Every profile of every recipe in configs/ runs: shrunk on 2 CPU workers, with its exact engine
settings, for a step, then checkpoint, resume for one more step and export.

What shrinks is the data (few rows, small images where the backbone takes them), the micro-batch,
the epochs and two widths (NARROW: the recsys table holds the catalogue, not 4M tracks; the
autonomous fusion transformer is 256 wide, not 2048: at full width two ranks of the 451M-parameter
model need ~9 GB each and this 24 GB machine runs out). What stays is what the engine does with
the recipe: ZeRO stage, offload, dtype, grad accumulation, flavour and backbone (ResNet-50s,
eight of them where the profile separates them), encoder, layer counts, the optimizer. The full
widths are built on the meta device in tests/test_models.py. GPU-only settings map to their CPU equivalents: 2 CPU workers over
gloo instead of GPUs over NCCL, and a GPU profile's `dtype: auto` (bf16 on GPUs) becomes bf16
where this CPU has native bf16. A profile added to a recipe is covered without editing this file;
the two tiny profiles in TRAINED_WHOLE run whole in the session's fixtures instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS

# Profiles a session fixture (conftest) trains whole, with the profile's engine settings, and
# whose task module resumes that run: trained here again they would only repeat ~1 min of start-up.
# recsys tiny stays below: its session run is ZeRO 3 with offload, not the shipped ZeRO 2.
TRAINED_WHOLE = {
    ("retinopathy", "tiny"): "retinopathy_cli (the README's main job); test_engine resumes its ZeRO 2 run",
    ("autonomous", "tiny"): "autonomous_run (bf16); test_autonomous resumes it",
}


def _profiles() -> list[tuple[str, str]]:
    out = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        out += [(path.stem, name) for name in raw.get("profiles") or {}]
    return [p for p in out if p not in TRAINED_WHOLE]


PROFILES = _profiles()
# the data each task's profiles shrink to: a step needs world x batch x grad_accum training rows
SHRINK = {
    "retinopathy": ["data.num_images=48", "data.rows_per_shard=16", "data.val_fraction=0.15"],
    "autonomous": ["data.num_samples=40", "data.rows_per_shard=16", "data.image_height=64", "data.image_width=96"],
    "recsys": [
        "data.num_tracks=300", "data.num_users=40", "data.num_sessions=200", "data.rows_per_shard=4000",
        "data.eval_negatives=9", "baselines.mf=false",
    ],
}  # fmt: skip
NARROW = {"retinopathy": {}, "autonomous": {"d_model": 256, "ff_dim": 1024}, "recsys": {"num_tracks": None}}


def shrunk(task: str, profile: str, data_root: Path, out: Path, *more: str):
    """The profile's recipe with its data, batch and epochs shrunk and GPU settings mapped to
    CPU ones; every engine setting as the profile has it."""
    from jobs.config import load_recipe
    from jobs.worker import native_bf16

    path = CONFIGS / f"{task}.yaml"
    recipe = load_recipe(path, profile)
    sets = [*SHRINK[task], f"data.root={data_root}", f"run.output_dir={out}", "train.log_every=1"]
    sets += [f"model.{k}={'null' if v is None else v}" for k, v in NARROW[task].items()]
    sets += [
        "scaling.num_workers=2",
        "scaling.use_gpu=false",
        "scaling.cpus_per_worker=1",
        "run.max_failures=0",
    ]
    sets += [f"train.batch_size={min(recipe.train.batch_size, 256 if task == 'recsys' else 2)}"]
    sets.append("train.eval_batch_size=null")
    if task == "retinopathy" and (recipe.model.backbone or recipe.model.flavour) not in (
        "inception_v3",
        "full",
    ):
        sets.append("data.image_size=96")  # InceptionV3's auxiliary head needs its 299 px
    if recipe.scaling.use_gpu and recipe.train.dtype == "auto":
        sets.append(f"train.dtype={'bf16' if native_bf16() else 'fp32'}")  # what auto is on a GPU
    return load_recipe(path, profile, [*sets, *more])


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mssd(tmp_path: Path, recipe) -> list[str]:
    """A profile that imports MSSD logs reads a folder in the published layout."""
    from data_loaders.recsys import write_mssd_csv

    if recipe.task != "recsys" or recipe.data.source != "mssd":
        return []
    write_mssd_csv(str(tmp_path / "mssd"), num_tracks=300, num_users=40, num_sessions=200)
    return [f"data.import_path={tmp_path / 'mssd'}"]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """Profiles whose shrunk data sections are equal read one prepared copy of the data."""
    base = tmp_path_factory.mktemp("profile-data")

    def root(recipe) -> Path:
        key = json.dumps(recipe.data.model_dump(mode="json", exclude={"root"}), sort_keys=True)
        return base / f"{recipe.task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    return root


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("task", "profile"), PROFILES, ids=[f"{t}-{p}" for t, p in PROFILES])
def test_profile_trains_resumes_and_exports(ray_local, shared_data, tmp_path, task, profile):
    from jobs import tasks
    from jobs.config import load_recipe
    from jobs.export import load_exported
    from jobs.train import train
    from jobs.worker import zero_stage

    first = shrunk(task, profile, tmp_path / "data", tmp_path / "runs")
    extra = _mssd(tmp_path, first)
    first = shrunk(task, profile, tmp_path / "data", tmp_path / "runs", *extra)
    data = shared_data(first)
    first = shrunk(task, profile, data, tmp_path / "runs", *extra, "train.max_steps=1")
    shipped = load_recipe(CONFIGS / f"{task}.yaml", profile)
    for key in ("zero_stage", "offload", "grad_accum", "lr", "weight_decay"):
        assert getattr(first.train, key) == getattr(shipped.train, key), key
    narrow = set(NARROW[task])
    assert first.model.model_dump(exclude=narrow) == shipped.model.model_dump(exclude=narrow)

    train(first, echo=False, export=False)  # one step, checkpointed
    (setup,) = [ln for ln in _lines(first.run_dir) if ln["kind"] == "setup"]
    assert setup["zero_stage"] == zero_stage(first, 2) and setup["world"] == 2
    assert setup["offload"] == first.train.offload
    assert setup["dtype"] in (("bf16", "fp32") if first.train.dtype == "auto" else (first.train.dtype,))

    # the same run started again with one more step: restored from its checkpoint, then exported
    again = train(
        first.model_copy(update={"train": first.train.model_copy(update={"max_steps": 2})}), echo=False
    )
    assert again["restores"] == [1] and again["steps"] == 2 and again["dtype"] == setup["dtype"]

    model, card = load_exported(again["paths"]["model"])
    assert (
        card["training"]["dtype"] == again["dtype"] and card["training"]["zero_stage"] == setup["zero_stage"]
    )
    built = tasks.build_model(first)  # the profile's exact architecture came back
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in built.parameters())
    assert json.loads((Path(again["paths"]["run_dir"]) / "summary.json").read_text())["steps"] == 2
