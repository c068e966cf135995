"""Export: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> consolidated fp32 weights
as safetensors + a model card. Loading an export needs torch, safetensors and `models` only."""

from __future__ import annotations

import contextlib
import io
import json
import math
import platform
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import models
from jobs.config import RecipeBase
from jobs.errors import UserError

WEIGHTS, CARD = "model.safetensors", "model_card.json"
# The drift reference (jobs.drift): features of at most this many validation rows, spread over the
# whole split; a task whose rows are expensive on a CPU lowers it with its own REFERENCE_ROWS.
REFERENCE_SPLIT, REFERENCE_ROWS = "val", 2048
LIBRARIES = ("torch", "torchvision", "deepspeed", "ray", "transformers", "pyarrow", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers from the shards of every rank, consolidated by DeepSpeed itself
    (zero_to_fp32 knows every layout it writes: ZeRO 1-3, offload, any world size). Parameters,
    gradients and optimizer states stay fp32 in every dtype (bf16 is autocast: jobs.worker), so
    these are the master weights, never bf16-rounded copies."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    # any rank's model-states file names the run's config (memory-mapped: no tensor is read)
    first = get_model_state_files(str(Path(checkpoint_dir, tag)))[0]
    states = torch.load(first, map_location="cpu", weights_only=False, mmap=True)
    if states["ds_config"]["zero_optimization"]["stage"] == 0:
        # no ZeRO (one rank without offload runs stage 0): rank 0's file holds the whole module
        return {
            k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in states["module"].items()
        }
    # it prints a line per step of its work and a progress bar per shard file
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def export(
    checkpoint_dir: Path,
    recipe: RecipeBase,
    out_dir: Path,
    *,
    tag: str,
    metrics: dict,
    baseline: dict | None = None,
    data_fingerprint: str | None = None,
    lineage: dict | None = None,
    training: dict | None = None,
) -> Path:
    from jobs import tasks

    task = tasks.get(recipe.task)
    state = consolidated_state_dict(Path(checkpoint_dir), tag)
    model = tasks.build_model(recipe)
    model.load_state_dict(state, strict=True)  # proves the export fits the architecture
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"task": recipe.task, "format": "pt"})
    # files serving needs besides the weights (recsys: the track catalogue); the registry copies
    # every file of this folder
    for path in map(Path, task.export_files(recipe)):
        if not path.is_file():
            raise UserError(
                f"{path} is missing: the exported {recipe.task} model needs it (prepare the data again)"
            )
        shutil.copyfile(path, out_dir / path.name)
    reference = reference_for(
        model,
        recipe.task,
        recipe.data.root,
        task.input_spec(recipe),
        task.REFERENCE_ROWS or REFERENCE_ROWS,
        batch_size=recipe.train.batch_size,
    )
    card = {
        "task": recipe.task,
        "model": {
            "name": recipe.model.name,
            "flavour": recipe.model.flavour,
            # the exported weights replace any pretrained file and any freezing
            "kwargs": {
                k: v for k, v in task.model_kwargs(recipe).items() if k not in ("pretrained", "freeze")
            },
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "input": task.input_spec(recipe),
        "metrics": metrics,
        "baseline": baseline,
        "data_fingerprint": data_fingerprint,
        "config_hash": recipe.config_hash(),
        "config": recipe.model_dump(mode="json"),
        "lineage": lineage or {},
        # how the workers trained it: dtype, ZeRO stage, world size, device (their setup line)
        "training": training or {},
        # None when the data has no validation split: serving then reports drift as unavailable
        "reference": reference,
        "libraries": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / CARD).write_text(json.dumps(card, indent=2))
    return out_dir


@torch.no_grad()
def reference_for(
    model: torch.nn.Module,
    task_name: str,
    data_root: str | Path,
    input_spec: dict,
    max_rows: int = REFERENCE_ROWS,
    *,
    batch_size: int = 32,
    split: str = REFERENCE_SPLIT,
) -> dict | None:
    """The card's drift reference: {"split", "rows", "features": jobs.drift.reference(...)} of the
    task's drift_features over at most `max_rows` rows of a split, or None when the data has no
    such split. The model (fp32, on the CPU) runs in eval mode; its mode is restored afterwards."""
    import numpy as np

    from data_loaders.errors import DataError
    from data_loaders.shards import load_manifest
    from jobs import drift, tasks

    task = tasks.get(task_name)
    try:
        total = load_manifest(str(data_root))["splits"][split]["rows"]
    except (DataError, KeyError):
        return None
    # every stride-th row: a split stored in time order (recsys: by day) is covered end to end,
    # not only its first hours
    stride = max(1, math.ceil(total / max_rows))
    cpu, seen, rows = torch.device("cpu"), 0, 0
    columns: dict[str, list[np.ndarray]] = {}
    pending: list[tuple[torch.Tensor, ...]] = []  # kept rows, run through the model a full batch at a time

    def run() -> None:
        x = tuple(torch.cat(parts) for parts in zip(*pending, strict=True))
        pending.clear()
        for name, v in task.drift_features(x, model(*x)).items():
            columns.setdefault(name, []).append(v)

    training = model.training
    model.eval()
    try:
        for batch in task.iter_split(data_root, split, batch_size, **input_spec):
            x = task.inputs(batch, cpu, torch.float32)
            n = len(x[0])
            # the rows at positions seen+i that fall on the stride (none in a batch shorter than
            # the gap to the next one: an imported day's last shard may be a few rows)
            keep = torch.arange(n)[-seen % stride :: stride][: max_rows - rows]
            seen += n
            if len(keep):
                pending.append(tuple(t[keep] for t in x))
                rows += len(keep)
            if sum(len(p[0]) for p in pending) >= batch_size:
                run()
            if rows >= max_rows:
                break
        if pending:
            run()
    finally:
        model.train(training)
    if not rows:
        return None
    features = drift.reference({name: np.concatenate(parts) for name, parts in columns.items()})
    return {"split": split, "rows": rows, "features": features}


def load_exported(model_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported model in eval mode, and its card; torch + safetensors + models only."""
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"no exported model at {model_dir} ({WEIGHTS} missing)")
    card = json.loads((model_dir / CARD).read_text())
    if card["model"]["name"] not in models.names():
        from jobs import tasks

        tasks.get(card["task"])  # a plugin task's architectures register with its functions
    model = models.build(card["model"]["name"], card["model"]["flavour"], **card["model"]["kwargs"])
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)), strict=True)
    return model.eval(), card
