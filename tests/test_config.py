"""Recipes are typed files that a test loads: every profile validates, overrides apply, docs stay in sync."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from jobs import tasks
from jobs.config import ConfigError, load_recipe
from tests.conftest import CONFIGS, ROOT

RECIPES = sorted(CONFIGS.glob("*.yaml"))
# deepfleet's own tasks' recipe types (the reference documents those; plugins document theirs)
TASK_RECIPES = {t: tasks.spec(t).recipe for t in tasks.builtin_names()}


def _profiles(path):
    import yaml

    return list((yaml.safe_load(path.read_text()).get("profiles") or {}).keys())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_profile_of_every_recipe_validates(path):
    assert {"tiny", "full"} <= set(_profiles(path))
    for profile in [None, *_profiles(path)]:
        recipe = load_recipe(path, profile)
        assert recipe.run_name.startswith(recipe.task)
    tiny = load_recipe(path, "tiny")
    assert not tiny.scaling.use_gpu and tiny.scaling.num_workers == 2 and tiny.train.zero_stage == 2
    assert load_recipe(path, "full").scaling.use_gpu


@pytest.mark.timeout(30)
def test_one_rank_runs_zero_stage_0_unless_it_offloads():
    from jobs.worker import deepspeed_config, zero_stage

    r = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", ["train.zero_stage=3"])
    assert zero_stage(r, 2) == 3 and zero_stage(r, 1) == 0  # nothing to partition over one rank
    assert deepspeed_config(r, 1, "fp32")["zero_optimization"] == {"stage": 0}
    offload = load_recipe(CONFIGS / "autonomous.yaml", "zero3")
    assert offload.train.offload == "cpu" and zero_stage(offload, 1) == 3  # ZeRO-Offload on one GPU
    config = deepspeed_config(offload, 1, "bf16")
    assert "offload_param" in config["zero_optimization"]
    # ZeRO-Offload steps AdamW on the host: DeepSpeed's CPU Adam, built from the config's section
    assert config["optimizer"]["type"] == "AdamW" and config["torch_autocast"]["enabled"]
    assert (
        "optimizer" not in deepspeed_config(r, 2, "fp32")
        and not deepspeed_config(r, 2, "fp32")["torch_autocast"]["enabled"]
    )


@pytest.mark.timeout(30)
def test_shuffled_windows_give_every_row_once_in_an_order_per_epoch():
    import numpy as np

    from jobs.worker import shuffled

    def epoch(seed: int) -> list[dict]:
        # windows of 10, 7 and 5 rows (a shard's last window is short), batches of 4
        rows = np.arange(22)
        windows = [{"id": rows[a:b], "x": rows[a:b] * 2.0} for a, b in ((0, 10), (10, 17), (17, 22))]
        return list(shuffled(iter(windows), 4, np.random.default_rng([0, seed])))

    first = epoch(0)
    assert [len(b["id"]) for b in first] == [4] * 5  # 22 rows: 5 whole batches, 2 left at the end
    ids = np.concatenate([b["id"] for b in first])
    assert len(set(ids)) == 20 and all((b["x"] == b["id"] * 2.0).all() for b in first)  # rows stay whole
    assert sorted(first[0]["id"]) != list(first[0]["id"]) or sorted(first[1]["id"]) != list(first[1]["id"])
    assert set(first[0]["id"]) | set(first[1]["id"]) <= set(range(10))  # a window mixes its own rows
    again, other = epoch(0), epoch(1)
    assert all(
        (a["id"] == b["id"]).all() for a, b in zip(first, again, strict=True)
    )  # a resumed epoch: same order
    assert any(
        (a["id"] != b["id"]).any() for a, b in zip(first, other, strict=True)
    )  # the next epoch: another


@pytest.mark.timeout(30)
def test_overrides_parse_as_yaml_and_reach_nested_fields():
    r = load_recipe(
        CONFIGS / "retinopathy.yaml", "tiny", ["train.lr=1e-3", "train.max_steps=7", "model.pretrained=null"]
    )
    assert r.train.lr == 1e-3 and r.train.max_steps == 7 and r.model.pretrained is None
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_recipe(CONFIGS / "retinopathy.yaml", "tiny", ["train.lr"])
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        load_recipe(CONFIGS / "retinopathy.yaml", "tiny", ["data.val_fraction=0.6", "data.test_fraction=0.5"])


@pytest.mark.timeout(30)
def test_config_hash_follows_the_model_not_the_bookkeeping():
    base = load_recipe(CONFIGS / "retinopathy.yaml", "tiny")
    same = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", ["run.name=other", "wandb.mode=disabled"])
    other = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", ["train.lr=0.1"])
    assert base.config_hash() == same.config_hash() != other.config_hash()


def _fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _fields(field.annotation, prefix + name + ".")
        elif name not in ("task", "profile"):
            assert field.description, f"{prefix}{name} has no doc"
            out.append(prefix + name)
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", sorted(TASK_RECIPES))
def test_every_field_is_documented_in_the_recipe_reference(task):
    reference = (ROOT / "docs" / "recipes.md").read_text()  # generated: python -m jobs.docs
    missing = [f for f in _fields(TASK_RECIPES[task]) if f"`{f}`" not in reference]
    assert not missing, missing
