"""`deepfleet bench --section gpu`: each task's full model on one GPU, under the engine, against a
plain PyTorch bf16 loop on the same GPU and batches; one prepared run of a few minutes on an H100.

For each run below (the recipe's full profile, one worker on one GPU, NCCL, the recipe's ZeRO
stage: one rank without offload runs stage 0; the zero3 profile keeps ZeRO 3 with CPU offload):

    data    prepared first at the recipe's full image size (fewer rows: the runs are short)
    plain   the task's model, AdamW, schedule and clipping in one process (PlainLoop), forward
            under torch.autocast bf16 as the engine runs it, on in-memory batches already on the
            GPU: the step alone, the ceiling our step is held against
    ours    jobs.train.train(recipe): Ray Data -> the worker -> DeepSpeed, for a fixed number of
            steps; samples/s from the steady progress windows, each window's split into waiting
            for data and computing (forward, backward, optimizer, gradient all-reduce), and the
            worker's peak GPU memory
    plan    jobs.plan's estimate of the GPU memory the run needs, against that peak
    MFU     training FLOPs per sample (torch.utils.flop_counter, forward + loss + backward) times
            our samples/s over the bf16 matmul peak measured in the same run

Without a GPU the section says so and measures nothing; `runs(..., device="cpu")` runs the same
code on CPU workers at tiny sizes (tests/test_bench_gpu.py keeps it from rotting).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from jobs.bench import target

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# (name, task, profile, data at full image size, steps, steps a progress window); quick halves the steps
RUNS = (
    ("retinopathy", "retinopathy", "full", ["data.num_images=1536"], 60, 10),
    ("autonomous", "autonomous", "full", ["data.num_samples=96"], 24, 4),
    ("autonomous-zero3", "autonomous", "zero3", ["data.num_samples=96"], 16, 4),
    ("recsys", "recsys", "full", ["data.num_sessions=20000", "baselines.mf=false"], 60, 10),
)
TARGET_IMAGES_PER_S = 3000  # retinopathy full (InceptionV3, 299 px) per H100
RATIO, MEMORY_ERROR = 0.95, 0.20


def recipe_for(
    task: str, profile: str, sets: list[str], work_dir: Path, name: str, steps: int, window: int, device: str
):
    from jobs.config import load_recipe

    gpu = device == "cuda"
    base = [
        f"data.root={work_dir / 'data' / name}",
        f"run.output_dir={work_dir / 'runs'}",
        f"run.name={name}",
        "scaling.num_workers=1",
        f"scaling.use_gpu={str(gpu).lower()}",
        # the rest of the machine's cores decode for the one worker
        f"scaling.cpus_per_worker={4 if gpu else 1}",
        "train.dtype=bf16",
        f"train.max_steps={steps}",
        "train.epochs=1000",
        f"train.log_every={window}",
        "train.checkpoint_every=null",
        "run.max_failures=0",
    ]
    return load_recipe(CONFIGS / f"{task}.yaml", profile, [*base, *sets])


def matmul_peak(device: str, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of torch.mm of n x n matrices on the device (median of timed products)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rates = []
    for i in range(repeats + 3):
        sync(device)
        tic = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 3:  # warm-up: clocks, cuBLAS's choice of kernel
            rates.append(2 * n**3 / (time.perf_counter() - tic))
    return statistics.median(rates)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_rate(recipe, batches: list[dict], device: str, steps: int) -> dict:
    """The plain bf16 loop on in-memory batches on the device: samples/s of `steps` steps after
    a warm-up of as many, its peak device memory, and FLOPs per sample counted on its model."""
    import itertools

    import torch

    from jobs.bench.train_step import PlainLoop, count_flops

    loop = PlainLoop(recipe, dtype="bf16", device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cycle = itertools.cycle(batches)
    for _ in range(steps):
        loop.step(next(cycle), sync=False)
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        loop.step(next(cycle), sync=False)
    sync(device)
    rate = steps * recipe.train.batch_size / (time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    batch = batches[0]
    dev = torch.device(device)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        flops = count_flops(
            loop.model,
            loop.task.inputs(batch, dev, torch.float32),
            lambda out: loop.task.loss(recipe, out, batch, dev),
            recipe.train.batch_size,
        )
    return {"samples_per_s": rate, "peak_memory": peak, "flops": flops}


def ours(recipe, window: int) -> dict:
    """Our engine for the recipe's max_steps: steady windows' samples/s, time split, peak memory."""
    from jobs.bench.train_step import steady_windows
    from jobs.train import train

    shutil.rmtree(recipe.run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    tic = time.perf_counter()
    train(recipe, echo=False, export=False)
    fit_s = time.perf_counter() - tic
    lines = [json.loads(ln) for ln in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(ln for ln in lines if ln["kind"] == "setup")
    trained = [ln for ln in lines if ln["kind"] == "train"]
    windows = steady_windows(trained) or trained[1:] or trained
    return {
        "samples_per_s": statistics.median(ln["samples_per_s"] for ln in windows),
        "windows": [ln["samples_per_s"] for ln in windows],
        "wait_s": statistics.median(ln["wait_s"] for ln in windows),
        "step_s": statistics.median(ln["step_s"] for ln in windows),
        "peak_memory": max((ln.get("device_memory_peak") or 0 for ln in trained), default=0) or None,
        "dtype": setup["dtype"],
        "zero_stage": setup["zero_stage"],
        "offload": setup.get("offload"),
        "device": setup["device"],
        "fit_s": round(fit_s, 1),
    }


def measure(
    name: str, recipe, window: int, device: str, peak: float, progress: Callable[[str], None]
) -> dict:
    from jobs import tasks
    from jobs.bench.train_step import memory_batches
    from jobs.plan import plan

    tic = time.perf_counter()
    tasks.get(recipe.task).prepare(recipe)
    progress(f"{name}: data at {recipe.data.root} ({time.perf_counter() - tic:.0f} s)")
    plain = plain_rate(recipe, memory_batches(recipe), device, steps=max(window, 5))
    if device == "cuda":  # the plain loop's model and optimizer are gone: its cached blocks too
        import torch

        torch.cuda.empty_cache()
    o = ours(recipe, window)
    flops = plain["flops"]["flops_per_sample"]
    estimate = plan(recipe.model_copy(deep=True))["gpu"]["total"] if device == "cuda" else None
    result = {
        "task": recipe.task,
        "profile": recipe.profile,
        "batch_size": recipe.train.batch_size,
        "grad_accum": recipe.train.grad_accum,
        "plain": plain,
        "ours": o,
        "ratio": o["samples_per_s"] / plain["samples_per_s"],
        "flops_per_sample": flops,
        "mfu": flops * o["samples_per_s"] / peak,
        "plain_mfu": flops * plain["samples_per_s"] / peak,
        "plan_memory": estimate,
        "memory_error": (o["peak_memory"] / estimate - 1) if estimate and o["peak_memory"] else None,
    }
    progress(
        f"{name}: ours {o['samples_per_s']:.1f} samples/s ({result['ratio']:.2f}x plain bf16 "
        f"{plain['samples_per_s']:.1f}; a step: compute {o['step_s'] * 1000:.1f} ms, data wait "
        f"{o['wait_s'] * 1000:.1f} ms), MFU {result['mfu']:.0%}, ZeRO {o['zero_stage']}, fit {o['fit_s']:.0f} s"
    )
    return result


def run(
    tasks: list[str],
    quick: bool,
    work_dir: Path,
    progress: Callable[[str], None],
    device: str | None = None,
    runs: tuple = RUNS,
) -> dict:
    import torch

    from cluster.local import connect

    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        progress("gpu: no CUDA device here: nothing measured (run it where a GPU is)")
        return {"device": None, "runs": {}}
    work_dir = Path(work_dir)
    connect()
    peak = matmul_peak(device) if device == "cuda" else matmul_peak(device, n=1024, repeats=3)
    progress(f"bf16 matmul peak on {device}: {peak / 1e12:.1f} TFLOP/s")
    out = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "bf16_peak": peak,
        "runs": {},
    }
    for name, task, profile, sets, steps, window in runs:
        if task not in tasks:
            continue
        steps = steps // 2 if quick else steps
        recipe = recipe_for(task, profile, sets, work_dir, name, steps, window, device)
        out["runs"][name] = measure(name, recipe, window, device, peak, progress)
    return out


def rows(result: dict) -> list[tuple[str, str, str]]:
    out = []
    for name, r in result.get("runs", {}).items():
        o, p = r["ours"], r["plain"]
        what = (
            f"{name}: ours, batch {r['batch_size']} x {r['grad_accum']}, ZeRO {o['zero_stage']}, {o['dtype']}"
        )
        out.append(
            (
                r["task"],
                what,
                f"{o['samples_per_s']:.1f} samples/s ({r['ratio']:.2f}x plain {p['samples_per_s']:.1f})",
            )
        )
        out.append(
            (
                r["task"],
                f"{name}: step split",
                f"compute {o['step_s'] * 1000:.1f} ms, data wait {o['wait_s'] * 1000:.1f} ms",
            )
        )
        out.append(
            (
                r["task"],
                f"{name}: model FLOP utilisation",
                f"{r['mfu']:.1%} of the bf16 peak (plain {r['plain_mfu']:.1%})",
            )
        )
        if r["plan_memory"]:
            measured = f"{o['peak_memory'] / 2**30:.1f}" if o["peak_memory"] else "?"
            out.append(
                (
                    r["task"],
                    f"{name}: peak GPU memory",
                    f"{measured} GiB (plan {r['plan_memory'] / 2**30:.1f} GiB)",
                )
            )
    if result.get("bf16_peak"):
        out.append(
            ("", f"bf16 matmul peak ({result['device']})", f"{result['bf16_peak'] / 1e12:.1f} TFLOP/s")
        )
    return out


def targets(result: dict) -> list[dict]:
    out = []
    for name, r in result.get("runs", {}).items():
        if r["task"] == "retinopathy":
            out.append(
                target(
                    "images/s per GPU, full model",
                    "retinopathy",
                    r["ours"]["samples_per_s"],
                    TARGET_IMAGES_PER_S,
                )
            )
        out.append(target(f"{name}: ratio to plain PyTorch bf16", r["task"], r["ratio"], RATIO))
        if r["memory_error"] is not None:
            out.append(
                target(
                    f"{name}: peak memory off the plan", r["task"], abs(r["memory_error"]), MEMORY_ERROR, "<="
                )
            )
    return out
