"""What batching buys: the same served model, the same clients, batch size 1 against @serve.batch.

    python -m serve.bench --registry registry [--duration 20] [--concurrency 16] [--address ...]

Deploys the task's production model with one model replica (autoscaling pinned, so replica
count cannot stand in for batching), drives it with N closed-loop clients for the duration at
max_batch_size 1 and then at the batched size (moved in place through user_config: same replica,
same process), and writes the ratio of requests/s, both measured in this run, to bench-serve.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path


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


def main(argv: list[str] | None = None) -> dict:
    from cluster.local import connect
    from jobs import serve as deploy
    from jobs.registry import Registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
