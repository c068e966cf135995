"""Evaluate an exported model with torch alone: score a split, write metrics.json and plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jobs import tasks
from jobs.config import recipe_from_dict
from jobs.export import load_exported


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    data_root: str | Path,
    split: str = "test",
    out_dir: Path | None = None,
    batch_size: int = 64,
) -> dict:
    from data_loaders.shards import load_manifest, verify

    model, card = load_exported(model_dir)
    task = tasks.get(card["task"])
    manifest = load_manifest(data_root)
    if split not in manifest["splits"]:
        raise FileNotFoundError(
            f"no split '{split}' in {data_root} (splits: {', '.join(manifest['splits'])})"
        )
    verify(data_root, manifest, splits=[split])
    cpu = torch.device("cpu")
    metric, example = task.metrics(recipe_from_dict(card["config"])), None
    for batch in task.iter_split(data_root, split, batch_size, **card["input"]):
        output = model(*task.inputs(batch, cpu, torch.float32))
        metric.update(output, task.targets(batch, cpu))
        example = example or (batch, output)
    result = {
        "split": split,
        "model": str(model_dir),
        "data_fingerprint": manifest["fingerprint"],
        **metric.compute(),
    }
    out_dir = Path(out_dir or Path(model_dir).parent / "eval" / split)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = task.plot(metric, example, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    main(["evaluate", *sys.argv[1:]])
