"""`deepfleet bench [--task ...] [--section ...] [--quick]`: every figure a ratio measured in one run.

Each section is a module with the same three functions:

    run(tasks, quick, work_dir, progress) -> dict     measure; JSON-ready
    rows(result) -> list[tuple[str, str, str]]        (task, what, value) lines of the printed table
    targets(result) -> list[dict]                     {"name", "task", "value", "target", "op", "met"}

Sections: train (our Ray Train + DeepSpeed step against a plain PyTorch loop, ZeRO 0-3, FLOPs
utilisation against the measured matmul peak), ingest (pyarrow, DataLoader, Ray Data), serve
(the served model against a bare FastAPI server; batching), search (ASHA against random search),
gpu (each task's full model on one GPU in bf16: samples/s, MFU, memory against the plan).
bench.json is rewritten after every section, so a killed run keeps what it measured.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from jobs.tasks import builtin_names

SECTIONS = {
    "train": "jobs.bench.train_step",
    "ingest": "jobs.bench.ingest",
    "serve": "jobs.bench.serving",
    "search": "jobs.bench.search",
    "gpu": "jobs.bench.gpu",
}


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # the model name, where Linux says it
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def median_rate(fn: Callable[[], int], repeats: int = 5, warmup: int = 1) -> dict:
    """Items per second of fn (which returns how many items it processed): warm-up calls first,
    then the median of `repeats` timed calls (and every repeat, to show the spread)."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        tic = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - tic))
    return {"median": statistics.median(rates), "repeats": rates}


def target(name: str, task: str | None, value: float | None, bound: float, op: str = ">=") -> dict:
    """One checked target: met when value op bound (None: not measured, not met)."""
    met = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {"name": name, "task": task, "value": value, "target": bound, "op": op, "met": bool(met)}


def bench(
    tasks: list[str] | None = None,
    sections: list[str] | None = None,
    quick: bool = False,
    out: str | Path = "bench.json",
    work_dir: str | Path = "runs/bench",
    progress: Callable[[str], None] = print,
) -> dict:
    # deepfleet's own tasks: the sections size their work per task (a plugin's would need its own)
    known = builtin_names()
    tasks, sections = list(tasks or known), list(sections or SECTIONS)
    for name in sections:
        if name not in SECTIONS:
            raise ValueError(f"unknown bench section '{name}' (sections: {', '.join(SECTIONS)})")
    for task in tasks:
        if task not in known:
            raise ValueError(f"unknown task '{task}' (tasks: {', '.join(known)})")
    out, work_dir = Path(out), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "quick": quick, "tasks": tasks, "sections": {}, "targets": []}
    for name in sections:
        module = importlib.import_module(SECTIONS[name])
        progress(f"== {name}")
        tic = time.perf_counter()
        section = module.run(tasks, quick=quick, work_dir=work_dir / name, progress=progress)
        section["wall_s"] = round(time.perf_counter() - tic, 1)
        result["sections"][name] = section
        result["targets"] += [{"section": name, **t} for t in module.targets(section)]
        out.write_text(json.dumps(result, indent=2, default=float))  # nothing lost if a later section dies
    return result


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(section, task, what, value) of every section in a result."""
    out = []
    for name, section in result["sections"].items():
        module = importlib.import_module(SECTIONS[name])
        out += [(name, *row) for row in module.rows(section)]
    return out


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    main(["bench", *sys.argv[1:]])
