"""The docs stay true: generated pages match their sources, links resolve, the README stays short."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from jobs import docs
from tests.conftest import CONFIGS, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", ["recipes.md", "benchmarks.md"])
def test_generated_pages_are_current(page):
    path = ROOT / "docs" / page
    expected = docs.pages()[path]
    assert path.is_file(), f"docs/{page} is missing: run `{docs.REGENERATE}`"
    assert path.read_text() == expected, f"docs/{page} is stale: run `{docs.REGENERATE}`"


@pytest.mark.timeout(60)
def test_the_reference_documents_every_field():
    from jobs import tasks

    RECIPES = {t: tasks.spec(t).recipe for t in tasks.builtin_names()}
    text = (ROOT / "docs" / "recipes.md").read_text()
    for cls in RECIPES.values():
        for name, field in docs.fields(cls):
            assert field.description, f"{name} has no doc in jobs/config.py"
            assert f"| `{name}` |" in text, name


@pytest.mark.timeout(30)
def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.timeout(30)
def test_benchmark_figures_name_their_command():
    bench = json.loads((ROOT / "docs" / "bench.json").read_text())
    for run in bench["runs"]:
        assert run["command"].startswith("deepfleet bench") and run["result"]["targets"], run["title"]
    for group in bench["measurements"]:
        for item in group["items"]:
            assert "commands" in item, item["what"]


@pytest.mark.timeout(180)  # imports the CLI and the loaders: seconds alone, a minute on a loaded machine
def test_config_show_prints_the_resolved_recipe_with_its_docs():
    from typer.testing import CliRunner

    from jobs.cli import app
    from jobs.config import load_recipe

    path = str(CONFIGS / "retinopathy.yaml")
    result = CliRunner().invoke(app, ["config", "show", path, "--profile", "tiny", "--set", "train.lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert "  # Passes over the training split.\n  epochs: 6\n" in result.output
    recipe = load_recipe(path, "tiny", ["train.lr=1e-3"])
    assert yaml.safe_load(result.output) == recipe.model_dump(mode="json")

    result = CliRunner().invoke(app, ["config", "show", path, "--profile", "huge"])
    assert result.exit_code == 1 and "no profile 'huge'" in result.output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_a_shown_recipe_loads_back_as_itself(path, tmp_path):
    from jobs.config import load_recipe

    for profile in [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]:
        recipe = load_recipe(path, profile)
        shown = tmp_path / f"{profile}.yaml"
        shown.write_text(docs.annotated_yaml(recipe, "header"))
        assert load_recipe(shown) == recipe, profile
