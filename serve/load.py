"""A closed-loop HTTP load generator: N clients each send their next request as soon as the last
one is answered (what "N concurrent clients" means in the benchmarks and tests).

One asyncio loop with aiohttp (it ships with Ray Serve) keeps the client's own CPU small, which
matters on a 2-core machine where the client shares the cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter


async def _load(
    url: str, bodies: list[bytes], concurrency: int, duration_s: float | None, total: int | None
) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    versions: Counter = Counter()
    timeline: list[tuple[float, int, str | None]] = []
    order = itertools.cycle(range(len(bodies)))
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s if duration_s else float("inf")

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (total is None or sent < total):
            sent += 1
            body = bodies[next(order)]
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    status, version = r.status, r.headers.get("x-model-version")
            except aiohttp.ClientError:
                status, version = -1, None  # connection refused or reset: a dropped request
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            statuses[status] += 1
            versions[version] += 1
            timeline.append((t1 - start, status, version))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    ok = statuses.get(200, 0)
    return {
        "requests": len(ms),
        "ok": ok,
        "errors": len(ms) - ok,
        "statuses": dict(statuses),
        "versions": {str(k): v for k, v in versions.items()},
        "wall_s": wall,
        "requests_per_s": ok / wall if wall else 0.0,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "timeline": timeline,
    }


def run(
    url: str,
    bodies: list[dict],
    concurrency: int = 16,
    duration_s: float | None = None,
    total: int | None = None,
) -> dict:
    """Drive `url` with `concurrency` clients cycling through `bodies` for `duration_s` seconds or
    `total` requests. Returns counts by status and by answering version (X-Model-Version),
    requests/s, p50/p99 latency (ms) and the timeline (seconds, status, version) of every answer."""
    if duration_s is None and total is None:
        raise ValueError("give duration_s or total")
    encoded = [json.dumps(b).encode() for b in bodies]
    return asyncio.run(_load(url, encoded, concurrency, duration_s, total))
