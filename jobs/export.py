"""Export: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> consolidated fp32 weights
as safetensors + a model card. Loading an export needs torch, safetensors and `models` only."""

from __future__ import annotations

import contextlib
import io
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import models
from jobs.config import RecipeBase

WEIGHTS, CARD = "model.safetensors", "model_card.json"
LIBRARIES = ("torch", "torchvision", "deepspeed", "ray", "transformers", "pyarrow", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def consolidated_state_dict(checkpoint_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers from the shards of every rank."""
    if zero_stage == 0:
        # no ZeRO: rank 0's model-states file holds the whole module
        state = torch.load(
            Path(checkpoint_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
        )
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
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
) -> Path:
    from jobs import tasks

    task = tasks.get(recipe.task)
    state = consolidated_state_dict(Path(checkpoint_dir), tag, recipe.train.zero_stage)
    model = tasks.build_model(recipe)
    model.load_state_dict(state, strict=True)  # proves the export fits the architecture
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"task": recipe.task, "format": "pt"})
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
        "libraries": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / CARD).write_text(json.dumps(card, indent=2))
    return out_dir


def load_exported(model_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported model in eval mode, and its card; torch + safetensors + models only."""
    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"no exported model at {model_dir} ({WEIGHTS} missing)")
    card = json.loads((model_dir / CARD).read_text())
    model = models.build(card["model"]["name"], card["model"]["flavour"], **card["model"]["kwargs"])
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)), strict=True)
    return model.eval(), card
