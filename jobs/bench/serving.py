"""Section "serve": the served retinopathy model against a bare FastAPI + uvicorn + torch server.

Same exported model, same request bodies (synthetic fundus photographs at the model's size),
same transform and answer, one torch thread on each side (the served model replica has one
CPU). For concurrency 1, 8 and 32, closed-loop clients drive: the bare server; the served
application with max_batch_size 1; and with @serve.batch (16, wait 10 ms). Batch settings move
in place through user_config, so both served rows run on the very same replica. Each cell is
the median (by requests/s) of the repeats, after a warm-up.

The batching gain alone, on a registry's production model (one replica, N clients, batch size 1
against @serve.batch, both in this run; written to bench-serve.json):

    python -m jobs.bench.serving --registry registry [--duration 20] [--concurrency 16] [--address ...]
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from jobs.bench import target

CONCURRENCY = (1, 8, 32)
BATCHED = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}
UNBATCHED = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(work_dir: Path, progress) -> tuple[Path, dict]:
    """A briefly trained tiny retinopathy model in a registry of its own (speed, not skill)."""
    from jobs.config import load_recipe
    from jobs.registry import Registry
    from jobs.train import train

    registry = Registry(work_dir / "registry")
    if registry.production("retinopathy") is None:
        progress("training a tiny retinopathy model to serve (a few steps)")
        recipe = load_recipe(
            Path(__file__).resolve().parents[2] / "configs" / "retinopathy.yaml",
            "tiny",
            [
                f"data.root={work_dir.parent / 'data' / 'retinopathy'}",
                f"run.output_dir={work_dir / 'runs'}",
                "scaling.num_workers=1",
                "train.max_steps=4",
            ],
        )
        summary = train(recipe)
        entry = registry.register(
            Path(summary["paths"]["model"]), test_metrics={}, lineage={"bench": "serve"}
        )
        registry.set_stage("retinopathy", entry["version"], "production", "serving benchmark")
    entry = registry.production("retinopathy")
    return work_dir / "registry", entry


def _bare(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.bench.bare_server",
            str(model_dir),
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/docs", timeout=2)
            return proc
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError("the bare server exited at start-up") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the bare server did not answer within 120 s")


def sample_bodies(task: str, card: dict, n: int = 32, seed: int = 7) -> list[dict]:
    """Request bodies from the task's synthetic generator at the model's input size."""
    if task != "retinopathy":
        raise ValueError(f"the serving benchmark measures retinopathy (got {task})")
    from data_loaders.retinopathy import generate

    size = card["input"]["image_size"]
    return [{"image": base64.b64encode(r["image"]).decode()} for r in generate(n, size, seed)]


def batching_gain(
    dashboard: str,
    url: str,
    task: str,
    version: str,
    bodies: list[dict],
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.01,
    duration_s: float = 20,
    concurrency: int = 16,
    warmup_s: float = 3,
    progress=print,
) -> dict:
    """requests/s at batch size 1 and at `max_batch_size` on the running application (the
    version's batching is reconfigured in place between the two), and their ratio."""
    from jobs.serve import set_batching
    from serve import load

    out = {"task": task, "version": version, "concurrency": concurrency, "duration_s": duration_s}
    for name, size in (("unbatched", 1), ("batched", max_batch_size)):
        user_config = {"max_batch_size": size, "batch_wait_timeout_s": batch_wait_timeout_s}
        set_batching(dashboard, task, version, user_config, progress=lambda _: None)
        load.run(f"{url}/predict", bodies, concurrency, duration_s=warmup_s)
        result = load.run(f"{url}/predict", bodies, concurrency, duration_s=duration_s)
        result.pop("timeline")
        out[name] = {"max_batch_size": size, **result}
        progress(
            f"{name:9} batch {size:3}: {result['requests_per_s']:7.1f} requests/s  p50 {result['p50_ms']:6.1f} ms  "
            f"p99 {result['p99_ms']:6.1f} ms  errors {result['errors']}"
        )
    out["throughput_ratio"] = out["batched"]["requests_per_s"] / max(out["unbatched"]["requests_per_s"], 1e-9)
    return out


def run(tasks: list[str], quick: bool, work_dir: Path, progress) -> dict:
    if "retinopathy" not in tasks:
        return {"skipped": "the serving benchmark measures the retinopathy model"}
    from ray import serve

    from cluster.local import connect
    from jobs import serve as deploy
    from jobs.registry import Registry
    from serve import load

    work_dir.mkdir(parents=True, exist_ok=True)
    registry, entry = _model(work_dir, progress)
    version = entry["version"]
    duration, repeats = (4.0, 1) if quick else (10.0, 3)
    connect()
    config = deploy.config_for(["retinopathy"], str(registry), port=_free_port())
    config["applications"][0]["args"] |= {
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},  # one replica: a fair fight
        "model_cpus": 1,
        "max_ongoing_requests": 256,
    }
    details = deploy.deploy(deploy.validate(config), deploy.dashboard_url(), progress=lambda _: None)
    dashboard = deploy.dashboard_url()
    servers = {"bare": None, "served_unbatched": UNBATCHED, "served_batched": BATCHED}
    urls = {
        "served_unbatched": deploy.urls(details)["retinopathy"] + "/predict",
        "served_batched": deploy.urls(details)["retinopathy"] + "/predict",
    }
    bare_port = _free_port()
    bare = _bare(Registry(registry).fetch("retinopathy", version), bare_port)
    urls["bare"] = f"http://127.0.0.1:{bare_port}/predict"
    bodies = sample_bodies("retinopathy", entry)
    cells: dict = {name: {} for name in servers}
    try:
        for name, user_config in servers.items():
            if user_config is not None:
                deploy.set_batching(dashboard, "retinopathy", version, user_config, lambda _: None)
            for c in CONCURRENCY:
                load.run(urls[name], bodies, c, duration_s=2)  # warm-up
                runs = []
                for _ in range(repeats):
                    r = load.run(urls[name], bodies, c, duration_s=duration)
                    r.pop("timeline")
                    runs.append(r)
                best = sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2]
                cells[name][str(c)] = {
                    **{k: best[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors", "requests")},
                    "repeats_requests_per_s": [r["requests_per_s"] for r in runs],
                }
                progress(
                    f"{name:17} c={c:2}: {best['requests_per_s']:7.1f} req/s  p50 {best['p50_ms']:6.1f} ms  "
                    f"p99 {best['p99_ms']:6.1f} ms  errors {best['errors']}"
                )
    finally:
        bare.terminate()
        bare.wait(timeout=30)
        serve.delete("retinopathy")
    c1, c32 = str(CONCURRENCY[0]), str(CONCURRENCY[-1])
    return {
        "model": f"retinopathy {version} ({entry['model']['flavour']}, {entry['input']['image_size']} px)",
        "duration_s": duration,
        "repeats": repeats,
        "batched": BATCHED,
        "cells": cells,
        "overhead_p50_ms_at_1": cells["served_unbatched"][c1]["p50_ms"] - cells["bare"][c1]["p50_ms"],
        "batched_overhead_p50_ms_at_1": cells["served_batched"][c1]["p50_ms"] - cells["bare"][c1]["p50_ms"],
        "batching_gain_at_32": cells["served_batched"][c32]["requests_per_s"]
        / max(cells["served_unbatched"][c32]["requests_per_s"], 1e-9),
        "served_over_bare_at_32": cells["served_batched"][c32]["requests_per_s"]
        / max(cells["bare"][c32]["requests_per_s"], 1e-9),
        "errors": sum(cell["errors"] for server in cells.values() for cell in server.values()),
    }


def rows(result: dict) -> list[tuple[str, str, str]]:
    if "skipped" in result:
        return [("retinopathy", "serving", result["skipped"])]
    out = []
    for name, cells in result["cells"].items():
        for c, cell in cells.items():
            out.append(
                (
                    "retinopathy",
                    f"{name.replace('_', ' ')}, {c} clients",
                    f"{cell['requests_per_s']:.1f} req/s, p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms",
                )
            )
    out.append(
        ("retinopathy", "serving overhead p50 at 1 client", f"{result['overhead_p50_ms_at_1']:.2f} ms")
    )
    out.append(("retinopathy", "batching gain at 32 clients", f"{result['batching_gain_at_32']:.2f}x"))
    out.append(("retinopathy", "served (batched) / bare at 32", f"{result['served_over_bare_at_32']:.2f}x"))
    return out


def targets(result: dict) -> list[dict]:
    if "skipped" in result:
        return []
    return [
        target(
            "serving overhead at 1 client, p50 ms over bare",
            "retinopathy",
            result["overhead_p50_ms_at_1"],
            3,
            "<=",
        ),
        target("batching throughput gain at 32 clients", "retinopathy", result["batching_gain_at_32"], 1.5),
        target("no failed requests", "retinopathy", result["errors"], 0, "<="),
    ]


def main(argv: list[str] | None = None) -> dict:
    """The batching gain on a registry's production model (see the module docstring)."""
    from cluster.local import connect
    from jobs import serve as deploy
    from jobs.registry import Registry

    p = argparse.ArgumentParser(description="What batching buys: batch size 1 against @serve.batch.")
    p.add_argument("--registry", default="registry")
    p.add_argument("--task", default="retinopathy")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--address", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default="bench-serve.json")
    a = p.parse_args(argv)

    entry = Registry(a.registry).resolve(a.task)
    config = deploy.config_for([a.task], a.registry, port=a.port)
    config["applications"][0]["args"] |= {
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model_cpus": 1,
        "max_ongoing_requests": 4 * a.concurrency,
    }
    connect(a.address)
    tic = time.perf_counter()
    details = deploy.deploy(deploy.validate(config), deploy.dashboard_url())
    print(f"deployed {a.task} {entry['version']} in {time.perf_counter() - tic:.0f} s")
    url = deploy.urls(details)[a.task]
    result = batching_gain(
        deploy.dashboard_url(),
        url,
        a.task,
        entry["version"],
        sample_bodies(a.task, entry),
        max_batch_size=a.batch,
        duration_s=a.duration,
        concurrency=a.concurrency,
    )
    print(f"batching raises throughput {result['throughput_ratio']:.2f}x ({a.concurrency} clients)")
    Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
