"""Register an exported model (scored on the test split) and move registry versions between stages.

python -m jobs.promote configs/retinopathy.yaml --profile tiny [--name RUN] [--version v3] [--stage production]
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import tasks
from jobs.config import RecipeBase
from jobs.errors import UserError
from jobs.registry import Registry, gate_failures


def ranking_metric(recipe: RecipeBase) -> str:
    """The metric production is compared on: the gate's, else the sweep's, else the task's first."""
    metric = recipe.registry.gate.metric or recipe.tune.metric or tasks.get(recipe.task).METRICS[0]
    if metric not in tasks.reported(recipe.task):
        raise UserError(
            f"'{metric}' is not a metric of the {recipe.task} task ({', '.join(tasks.reported(recipe.task))})"
        )
    return metric


def register_run(recipe: RecipeBase, model_dir: Path | None = None, lineage: dict | None = None) -> dict:
    """Score a run's exported model on the test split and register it as a candidate."""
    from jobs.evaluate import evaluate

    model_dir = Path(model_dir or recipe.run_dir / "model")
    if not (model_dir / "model_card.json").is_file():
        raise UserError(f"no exported model at {model_dir}: train the run first (deepfleet train ...)")
    result = evaluate(model_dir, recipe.data.root, split="test")
    test_metrics = {k: result[k] for k in (*tasks.reported(recipe.task), "val_rows") if k in result}
    summary_path = model_dir.parent / "summary.json"
    wandb = json.loads(summary_path.read_text())["paths"].get("wandb") if summary_path.is_file() else None
    lineage = {"run": str(model_dir.parent), "wandb": wandb, **(lineage or {})}
    return Registry(recipe.registry.uri).register(model_dir, test_metrics=test_metrics, lineage=lineage)


def promote(recipe: RecipeBase, version: str, *, force: bool = False, why: str = "promoted by hand") -> dict:
    """Make a registered version production if it passes the recipe's gate (or `force`)."""
    registry = Registry(recipe.registry.uri)
    entry = registry.entry(recipe.task, version)
    if entry["stage"] == "production":
        return entry
    production = registry.production(recipe.task)
    failures = gate_failures(
        recipe.task, entry["test_metrics"], recipe.registry.gate, production, ranking_metric(recipe)
    )
    if failures and not force:
        raise UserError(f"promotion of {recipe.task} {version} refused: {'; '.join(failures)}")
    if failures:
        why = f"{why} (forced past: {'; '.join(failures)})"
    return registry.set_stage(recipe.task, version, "production", why)


def main(argv: list[str] | None = None) -> None:
    from jobs.cli import main as cli

    cli(["promote", *(argv or [])])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
