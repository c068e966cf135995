"""python -m jobs.plan CONFIG [--profile NAME] [--gpu-memory GB] [--gpus N]: will the recipe fit?

Hours into a run is a bad time to learn that a GPU is out of memory. The plan counts what a
training step keeps per GPU (weights, gradients and AdamW states as ZeRO lays them out, plus the
activations autograd saves for backward, measured on the model itself without computing
anything) and the host memory a node needs, and check_fits() turns that into one line before
any worker starts.
"""

from __future__ import annotations

import time

import torch

from jobs import tasks
from jobs.config import RecipeBase
from jobs.errors import UserError

GB = 1e9
HEADROOM = 0.10
"""Share of each GPU left for what the plan does not count: the CUDA and NCCL contexts, the
caching allocator's fragmentation, DeepSpeed's communication buckets and ZeRO-3's prefetch."""
MAX_GPUS = 1024


def parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters, and the largest layer's own (what ZeRO-3 gathers at once;
    counted as DeepSpeed's model_to_params counts it)."""
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "largest_layer": largest,
    }


def model_states(
    total: int, trainable: int, largest: int, stage: int, offload: str, world: int
) -> dict[str, dict[str, float]]:
    """Bytes of weights, gradients and optimizer states on each GPU, and in host memory per GPU.

    All of them are fp32 (bf16 is torch autocast around fp32 weights: jobs.worker.deepspeed_config),
    so a parameter costs 4 weight + 4 gradient + 8 AdamW (exp_avg, exp_avg_sq) bytes, split as in
    ZeRO (Rajbhandari et al. 2020): stage 1 splits optimizer states over the ranks, 2 also
    gradients, 3 also weights; offload moves the optimizer's share (and at stage 3 the weights')
    into host memory. DeepSpeed's own estimators (estimate_zero2/zero3_model_states_mem_needs)
    assume 2-byte weights and say nothing of stages 0 and 1, hence this formula; against them
    (tests/test_plan.py checks each difference):
    - weights are 4 bytes, not 2, and gradients exist once, in fp32 (no 2-byte copy);
    - ZeRO 1-2 still clone an fp32 master partition of the weights (stage_1_and_2.py,
      weights_partition); ZeRO 3 without offload steps the fp32 weights in place (stage3.py);
    - ZeRO 3 gathers a layer's weights and gradients whole: 8 bytes a parameter, not 4."""
    opt_ranks = world if stage >= 1 else 1
    grad_ranks = world if stage >= 2 else 1
    on_host = offload == "cpu" and stage >= 1  # DeepSpeed offloads from ZeRO 1 up only
    master = 4 if stage in (1, 2) or (stage == 3 and on_host) else 0
    gpu = {
        "weights": 0 if on_host and stage == 3 else 4 * total / (world if stage == 3 else 1),
        "gathered layer": 8 * largest if stage == 3 else 0,
        "gradients": 0 if on_host and stage >= 2 else 4 * trainable / grad_ranks,
        "optimizer": 0 if on_host else (master + 8) * trainable / opt_ranks,
    }
    host = {
        "weights": 4 * total / world if on_host and stage == 3 else 0,
        "gradients": 4 * trainable / opt_ranks if on_host else 0,
        "optimizer": (master + 8) * trainable / opt_ranks if on_host else 0,
    }
    return {"gpu": gpu, "host": host}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def saved_bytes(model: torch.nn.Module, recipe: RecipeBase, rows: int, bf16: bool, mode=None) -> int:
    """Bytes of the tensors autograd keeps for backward after a training forward pass of `rows`
    samples, each storage counted once; storages of the model's weights and buffers are model
    states, not activations. Backward is not run: everything it needs is saved by then."""
    task = tasks.get(recipe.task)
    inputs = task.inputs(task.example_batch(recipe, rows), torch.device("cpu"), torch.float32)
    if mode is not None:
        inputs = [mode.from_tensor(x) for x in inputs]
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, torch.UntypedStorage] = {}  # by StorageImpl address; holding them keeps it unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in own:
            saved[s._cdata] = s
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        out = model(*inputs)
        # a scalar loss of every output, as a task loss would touch them (what it saves is tiny)
        sum(t.float().sum() for t in _tensors(out) if t.is_floating_point())
    return sum(s.nbytes() for s in saved.values())


def activations(model: torch.nn.Module, recipe: RecipeBase, bf16: bool) -> dict:
    """Saved bytes per sample and per step whatever the batch (autocast's bf16 copies of the
    weights), from two small batches. The model (built on the meta device) runs on fake tensors:
    shapes and dtypes without memory or compute, seconds for the full models. Fake rather than
    meta tensors because they pass for CPU tensors, so CPU autocast casts them as it would on a
    GPU; an operator they lack falls back to real tensors on the CPU. Two rows is the least:
    InceptionV3's auxiliary head normalises a 1x1 map, which one row cannot train."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tic, small, large = time.perf_counter(), 2, 3
    model.train()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model.to_empty(device="cpu")
            a, b = (saved_bytes(model, recipe, n, bf16, mode) for n in (small, large))
        measured_on = "fake tensors"
    except (RuntimeError, NotImplementedError):
        model.to_empty(device="cpu")  # real memory: uninitialised weights are as big as trained ones
        a, b = (saved_bytes(model, recipe, n, bf16) for n in (small, large))
        measured_on = "cpu"
    per_sample = (b - a) / (large - small)
    return {
        "per_sample": per_sample,
        "per_step": max(0.0, a - small * per_sample),
        "measured_on": measured_on,
        "seconds": round(time.perf_counter() - tic, 2),
    }


def plan(recipe: RecipeBase, gpu_memory_bytes: float = 80 * GB, gpus_per_node: int = 8) -> dict:
    """Memory per GPU and host memory per node of the recipe as it would train, and the fewest
    GPUs of `gpu_memory_bytes` it fits on."""
    from jobs.worker import zero_stage

    tic, t, world = time.perf_counter(), recipe.train, recipe.scaling.num_workers
    # auto is bf16 on GPUs; on CPU workers it may be bf16 too (jobs.worker.resolve_dtype), for
    # which the fp32 plan here is an upper bound
    dtype = t.dtype if t.dtype != "auto" else "bf16" if recipe.scaling.use_gpu else "fp32"
    with torch.device("meta"):
        model = tasks.build_model(recipe)
    counts = parameters(model)
    act = activations(model, recipe, dtype == "bf16")
    act["batch_size"] = t.batch_size
    act_bytes = act["per_sample"] * t.batch_size + act["per_step"]
    headroom = HEADROOM * gpu_memory_bytes

    def states(n: int) -> dict:
        return model_states(
            counts["total"], counts["trainable"], counts["largest_layer"], zero_stage(recipe, n), t.offload, n
        )

    def gpu_total(n: int) -> float:
        return sum(states(n)["gpu"].values()) + act_bytes + headroom

    needed = next((n for n in range(1, MAX_GPUS + 1) if gpu_total(n) <= gpu_memory_bytes), None)
    s, per_node = states(world), min(gpus_per_node, world)
    # every rank builds the whole fp32 model in host memory before DeepSpeed moves or splits it
    host_per_gpu = max(4 * counts["total"], sum(s["host"].values()))
    return {
        "task": recipe.task,
        "profile": recipe.profile,
        "model": f"{recipe.model.name} {recipe.model.flavour}",
        "dtype": dtype,
        "parameters": counts,
        "world": world,
        "zero_stage": zero_stage(recipe, world),
        "offload": t.offload,
        "gpu": {
            **s["gpu"],
            "model states": sum(s["gpu"].values()),
            "activations": act_bytes,
            "headroom": headroom,
            "total": gpu_total(world),
        },
        "host": {**s["host"], "per gpu": host_per_gpu, "per node": host_per_gpu * per_node},
        "gpus_per_node": per_node,
        "activations": act,
        "gpu_memory": gpu_memory_bytes,
        "gpus_needed": needed,
        "fits": gpu_total(world) <= gpu_memory_bytes,
        "seconds": round(time.perf_counter() - tic, 2),
    }


def check_fits(
    recipe: RecipeBase,
    gpu_memory_bytes: float | None,
    host_memory_bytes: float | None,
    gpus_per_node: int = 8,
    device: str = "GPU",
) -> None:
    """UserError (one line, with the numbers) when a worker's GPU or a node's host memory cannot
    hold the recipe's training step; nothing is measured when neither size is known."""
    if gpu_memory_bytes is None and host_memory_bytes is None:
        return
    p = plan(recipe, gpu_memory_bytes or 80 * GB, gpus_per_node)
    g, where = p["gpu"], f"at ZeRO {p['zero_stage']} over {p['world']} {device}s"
    if gpu_memory_bytes is not None and not p["fits"]:
        a, more, room = p["activations"], p["gpus_needed"], gpu_memory_bytes - g["headroom"]
        # only what would make it fit: ZeRO 3 with offload still gathers a layer and keeps activations
        sharded = g["activations"] + 8 * p["parameters"]["largest_layer"] <= room
        batch = int((room - g["model states"] - a["per_step"]) // a["per_sample"]) if a["per_sample"] else 0
        fixes = [
            *(["train.zero_stage 3"] if sharded and p["zero_stage"] < 3 else []),
            *(["train.offload cpu"] if sharded and p["offload"] == "none" else []),
            *([f"train.batch_size {batch} or less"] if 0 < batch < recipe.train.batch_size else []),
            *([f"{more} workers"] if more and more > p["world"] else []),
        ] or [f"{device}s with more memory"]
        raise UserError(
            f"recipe needs {g['total'] / GB:.1f} GB per {device} {where} (model states "
            f"{g['model states'] / GB:.1f} GB + activations {g['activations'] / GB:.1f} GB at batch "
            f"{recipe.train.batch_size} + headroom {g['headroom'] / GB:.1f} GB) but the {device}s have "
            f"{gpu_memory_bytes / GB:.1f} GB: use {_either(fixes)}"
        )
    h = p["host"]
    if host_memory_bytes is not None and h["per node"] > host_memory_bytes:
        fixes = [
            f"fewer {device}s a node",
            "more nodes",
            *(["train.offload none"] if p["offload"] == "cpu" else []),
        ]
        raise UserError(
            f"recipe needs {h['per node'] / GB:.1f} GB of host memory per node {where} "
            f"({p['gpus_per_node']} {device}s a node x {h['per gpu'] / GB:.1f} GB: offloaded states "
            f"(train.offload {p['offload']}) or the fp32 model each rank builds) but the nodes have "
            f"{host_memory_bytes / GB:.1f} GB: use {_either(fixes)}"
        )


def _either(options: list[str]) -> str:
    return f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else options[0]


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    main(["plan", *sys.argv[1:]])
