"""A loader's typed settings hold its data rules once: a recipe is checked through them, and
`prepare(settings)` is the loose `prepare(**fields)` a script writes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from data_loaders import autonomous, recsys, retinopathy
from data_loaders.errors import DataError
from jobs.config import ConfigError, load_recipe
from tests.conftest import CONFIGS

SETTINGS = {
    "retinopathy": retinopathy.RetinopathySettings,
    "autonomous": autonomous.AutonomousSettings,
    "recsys": recsys.RecsysSettings,
}
BROKEN = [
    ("retinopathy", "on_bad_image", "ignore", "on_bad_image must be one of skip, fail, got 'ignore'"),
    ("retinopathy", "label_noise", 1.5, "label_noise must be in [0, 1], got 1.5"),
    ("autonomous", "source", "lidar", "unknown data source 'lidar': choose one of synthetic, rig"),
    ("autonomous", "lane_points", 1, "and lane_points >= 2, got"),
    ("recsys", "eval_negatives", 0, "eval_negatives must be >= 1, got 0"),
    ("recsys", "test_fraction", 0.9, "val_fraction + test_fraction must be below 1"),
    # object storage is refused, not written to a local folder named "s3:" (issue 21 reads it)
    ("retinopathy", "root", "s3://bucket/data", "root is s3://bucket/data: object storage is not read"),
    ("autonomous", "import_path", "gs://bucket/rigs", "import_path is gs://bucket/rigs: object storage"),
    ("recsys", "root", "s3://bucket/recsys", "root is s3://bucket/recsys: object storage is not read"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task, key, value, message", BROKEN, ids=lambda v: str(v)[:24])
def test_the_recipe_and_the_loader_refuse_a_value_with_one_rule(task, key, value, message):
    settings = load_recipe(CONFIGS / f"{task}.yaml", "tiny").data.settings()
    assert type(settings) is SETTINGS[task]
    with pytest.raises(DataError, match=re.escape(message)):
        dataclasses.replace(settings, **{key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(CONFIGS / f"{task}.yaml", "tiny", [f"data.{key}={value}"])


@pytest.mark.timeout(60)
def test_prepare_takes_settings_or_their_fields(tmp_path):
    recipe = load_recipe(
        CONFIGS / "retinopathy.yaml",
        "tiny",
        ["data.num_images=6", "data.image_size=32", f"data.root={tmp_path}"],
    )
    manifest = retinopathy.prepare(recipe.data.settings())
    assert sum(s["rows"] for s in manifest["splits"].values()) == 6
    fields = dataclasses.asdict(recipe.data.settings())
    assert retinopathy.prepare(**fields) == manifest  # the same dataset: reused, not written again
