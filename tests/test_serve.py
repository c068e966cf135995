"""Serving: tiny training runs of the three tasks are registered, `deepfleet serve` deploys the
shipped Serve config on the session cluster, and real HTTP clients check answers, bad input,
canary traffic, drift and batching."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml
from PIL import Image

from tests.conftest import CONFIGS, ROOT
from tests.test_cli import deepfleet, one_line_error

SERVE_CONFIG = CONFIGS / "serve" / "deepfleet.yaml"


def _data_root(summary: dict) -> Path:
    card = json.loads((Path(summary["paths"]["model"]) / "model_card.json").read_text())
    return Path(card["config"]["data"]["root"])


@pytest.fixture(scope="module")
def registry(retinopathy_run, autonomous_run, recsys_run, tmp_path_factory) -> dict:
    """Each task's tiny run (trained once per session, conftest) registered and promoted;
    retinopathy gets a second version (v2) to serve as the canary. The registry's copies are
    what the tests compare served answers with (the tasks' own modules resume their runs)."""
    from jobs.registry import Registry

    tmp = tmp_path_factory.mktemp("serve")
    runs = {"retinopathy": retinopathy_run, "autonomous": autonomous_run, "recsys": recsys_run}
    reg = Registry(tmp / "registry")
    for task, run in runs.items():
        entry = reg.register(run["paths"]["model"], test_metrics={}, lineage={"run": run["paths"]["run_dir"]})
        reg.set_stage(task, entry["version"], "production", "test")
    reg.register(retinopathy_run["paths"]["model"], test_metrics={}, lineage={"run": "canary"})  # v2
    return {
        "uri": str(tmp / "registry"),
        "models": {task: reg.fetch(task, "v1") for task in runs},
        "data": {task: _data_root(run) for task, run in runs.items()},
        "tmp": tmp,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(registry, ray_local) -> dict:
    """`deepfleet serve --config configs/serve/deepfleet.yaml --registry ... --address <session
    cluster>` with the file's resources scaled to 2 cores and a retinopathy canary at 10%."""
    from ray import serve

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": _free_port()}
    for app in config["applications"]:
        # one replica per version (throughput ratios must not measure autoscaling), small CPU shares
        app["args"] |= {
            "model_cpus": 0.5,
            "model_gpus": 0,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        }
    retinopathy = config["applications"][0]["args"]
    retinopathy |= {"canary": "v2", "canary_percent": 10, "drift": {"threshold": 0.2, "window": 500}}
    path = registry["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray_local.get_runtime_context().gcs_address
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "serve", "--config", str(path), "--registry", registry["uri"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": address},
    )
    print(f"deepfleet serve: {time.perf_counter() - tic:.0f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base = f"http://127.0.0.1:{config['http_options']['port']}"
    yield {"base": base, "stdout": proc.stdout, "config": config, **registry}
    serve.shutdown()  # later tests need the CPUs back


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def _test_images(root: Path, n: int) -> list[bytes]:
    """n images spread over the whole test split (a shard's first rows are not a fair sample)."""
    images = pq.read_table(sorted((Path(root) / "test").glob("*.parquet")), columns=["image"]).column("image")
    return [images[int(i)].as_py() for i in np.linspace(0, len(images) - 1, n).round()]


def _post(served, task: str, body, **kw) -> requests.Response:
    return requests.post(f"{served['base']}/{task}/predict", json=body, timeout=60, **kw)


@pytest.mark.timeout(1800)  # alone, the first test pays for the three tiny fits and the deployment
def test_deepfleet_serve_answers_all_three_tasks(served):
    from data_loaders.retinopathy import preprocess_image
    from jobs import tasks
    from jobs.export import load_exported

    cpu = torch.device("cpu")
    for task in ("retinopathy", "autonomous", "recsys"):
        assert f"POST {served['base']}/{task}/predict" in served["stdout"]
        health = requests.get(f"{served['base']}/{task}/health", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        assert requests.get(f"{served['base']}/{task}/docs", timeout=30).status_code == 200
    assert set(requests.get(f"{served['base']}/retinopathy/health").json()["versions"]) == {"v1", "v2"}
    # one version: the ingress holds the model (one hop); a canary release: a deployment per version
    from ray import serve

    apps = serve.status().applications
    assert set(apps["autonomous"].deployments) == set(apps["recsys"].deployments) == {"ingress"}
    assert set(apps["retinopathy"].deployments) == {"ingress", "model-v1", "model-v2"}

    # retinopathy: the served answer is the exported model's offline prediction for the same image
    model, card = load_exported(served["models"]["retinopathy"])
    for png in _test_images(served["data"]["retinopathy"], 4):
        r = _post(served, "retinopathy", {"image": _b64(png)})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["version"] == r.headers["x-model-version"] in ("v1", "v2")
        with torch.no_grad():
            x = {"image": preprocess_image(png, card["input"]["image_size"])[None]}
            p = torch.softmax(model(*tasks.get("retinopathy").inputs(x, cpu, torch.float32)), -1)[0].numpy()
        np.testing.assert_allclose(answer["probabilities"], p, atol=1e-5)
        assert answer["grade"] == int(p.argmax()) and answer["referable"] == (p[2:].sum() >= 0.5)

    # autonomous: eight cameras of objects and lanes, depth every 8 px equal to the offline model's
    from data_loaders.autonomous import NUM_CAMERAS, preprocess_images

    model, card = load_exported(served["models"]["autonomous"])
    path = sorted((served["data"]["autonomous"] / "test").glob("*.parquet"))[0]
    rig = pq.read_table(path, columns=["images"]).slice(0, 1).to_pylist()[0]["images"]
    r = _post(served, "autonomous", {"images": [_b64(png) for png in rig], "score_threshold": 0.0})
    assert r.status_code == 200, r.text
    answer = r.json()
    h, w = card["input"]["image_size"]
    assert [c["camera"] for c in answer["cameras"]] == list(range(NUM_CAMERAS))
    for camera in answer["cameras"]:  # a threshold of 0 returns every query, best first
        scores = [o["score"] for o in camera["objects"]]
        assert scores and scores == sorted(scores, reverse=True)
        assert all(
            len(o["box"]) == 4 and o["label"] in ("car", "truck", "pedestrian") for o in camera["objects"]
        )
    rgbs = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in rig]
    with torch.no_grad():
        x = {"images": preprocess_images(rgbs, (h, w))[None]}
        depth = model(*tasks.get("autonomous").inputs(x, cpu, torch.float32))["depth"][0]
    offline = torch.nn.functional.avg_pool2d(depth[:, None], 8, 8)[:, 0].numpy()
    np.testing.assert_allclose(answer["depth"]["metres"], offline, atol=0.006)
    assert np.asarray(answer["depth"]["metres"]).shape == (NUM_CAMERAS, h // 8, w // 8)

    # recsys: the candidates come back ranked by play probability, cold tracks flagged
    from data_loaders.recsys import load_catalogue

    cat = load_catalogue(str(served["models"]["recsys"]))
    ids = [str(t) for t in cat.track_id[1:]]
    cold = [t for t, c in zip(ids, cat.is_cold[1:], strict=True) if c]
    candidates = ids[5:20] + cold[:3]
    body = {
        "history": [{"track_id": t, "skip_2": i % 2 == 1} for i, t in enumerate(ids[:6])],
        "candidates": candidates,
    }
    r = _post(served, "recsys", body)
    assert r.status_code == 200, r.text
    ranked = r.json()["ranked"]
    assert sorted(t["track_id"] for t in ranked) == sorted(candidates)
    probs = [t["play_probability"] for t in ranked]
    assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    assert [t["rank"] for t in ranked] == list(range(1, len(candidates) + 1))
    assert {t["track_id"] for t in ranked if t["cold"]} == set(cold[:3])


@pytest.mark.timeout(300)
def test_the_client_examples_run_against_the_served_models(served, tmp_path):
    from data_loaders.recsys import load_catalogue

    def example(name: str, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "serve" / "examples" / f"{name}_client.py"), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    photo = tmp_path / "photo.png"
    photo.write_bytes(_test_images(served["data"]["retinopathy"], 1)[0])
    assert "grade " in example("retinopathy", str(photo), "--url", f"{served['base']}/retinopathy")
    path = sorted((served["data"]["autonomous"] / "test").glob("*.parquet"))[0]
    rig = pq.read_table(path, columns=["images"]).slice(0, 1).to_pylist()[0]["images"]
    for i, png in enumerate(rig):
        (tmp_path / f"cam{i}.png").write_bytes(png)
    text = example("autonomous", str(tmp_path), "--url", f"{served['base']}/autonomous")
    assert text.count("camera ") == 8
    ids = [str(t) for t in load_catalogue(str(served["models"]["recsys"])).track_id[1:8]]
    text = example(
        "recsys", "--history", ",".join(ids[:3]), "--skipped", ids[1], "--candidates", ",".join(ids[3:]),
        "--url", f"{served['base']}/recsys",
    )  # fmt: skip
    assert all(t in text for t in ids[3:]) and "  1. " in text


@pytest.mark.timeout(300)
def test_bad_input_gets_4xx_with_a_message_never_5xx(served):
    png = _test_images(served["data"]["retinopathy"], 1)[0]
    url = served["base"]
    big = served["config"]["applications"][0]["args"]["max_body_bytes"]
    cases = {
        "malformed JSON": (
            "retinopathy",
            {"data": "{not json", "headers": {"content-type": "application/json"}},
        ),
        "missing field": ("retinopathy", {"json": {}}),
        "misspelt field": ("retinopathy", {"json": {"img": _b64(png)}}),
        "wrong type": ("retinopathy", {"json": {"image": 42}}),
        "not base64": ("retinopathy", {"json": {"image": "%%% not base64 %%%"}}),
        "image that does not decode": ("retinopathy", {"json": {"image": _b64(b"GIF89a but not really")}}),
        "wrong number of cameras": ("autonomous", {"json": {"images": [_b64(png)] * 7}}),
        "camera image of the wrong size": ("autonomous", {"json": {"images": [_b64(png)] * 8}}),
        "unknown track id": ("recsys", {"json": {"history": [], "candidates": ["no-such-track"]}}),
        "unknown context type": (
            "recsys",
            {"json": {"history": [], "context": {"context_type": "tv"}, "candidates": ["x"]}},
        ),
        "body over the size limit": ("retinopathy", {"json": {"image": "A" * (big + 1)}}),
    }
    for name, (task, kw) in cases.items():
        r = requests.post(f"{url}/{task}/predict", timeout=60, **kw)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail, (name, r.text[:300])
        print(f"{name}: {r.status_code} {detail[:120]}")
    # values that pass a type check but no calendar, digit set or int64: 422 naming the field
    hostile = [
        ("context.date", {"context": {"date": "2018-13-45"}}),
        ("context.date", {"context": {"date": "\uff12\uff10\uff11\uff18-07-15"}}),  # fullwidth digits
        ("context.session_position", {"context": {"session_position": 10**40}}),
        (
            "history.0.hist_user_behavior_n_seekfwd",
            {"history": [{"track_id": "x", "hist_user_behavior_n_seekfwd": 2**64}]},
        ),
    ]
    for field, body in hostile:
        r = requests.post(
            f"{url}/recsys/predict", json={"history": [], "candidates": ["x"], **body}, timeout=60
        )
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}:"), (field, r.text[:300])
    # a Content-Length that is not a number (an HTTP client would correct it: sent by hand)
    with socket.create_connection(("127.0.0.1", served["config"]["http_options"]["port"]), timeout=30) as s:
        s.sendall(b"POST /retinopathy/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n{}")
        reply = s.recv(65536)
    assert reply[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400"), reply[:300]
    r = requests.post(f"{url}/recsys/predict", json={"history": [], "candidates": ["nope", "nada"]})
    assert "nope" in r.json()["detail"]
    assert "8" in requests.post(f"{url}/autonomous/predict", json={"images": ["x"] * 3}).json()["detail"]


FUZZ_EXAMPLES = 300


def _fuzz(base: str, session: requests.Session) -> dict[int, int]:
    """FUZZ_EXAMPLES requests to POST {base}/predict generated from its OpenAPI document, valid
    by the schema and not (schemathesis's positive and negative modes, through hypothesis); the
    statuses they got. Fails at the first 5xx, naming the body."""
    from collections import Counter

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    doc = session.get(f"{base}/openapi.json", timeout=60).json()
    operation = schemathesis.openapi.from_dict(doc).find_operation_by_path("POST", "/predict")
    statuses: Counter = Counter()

    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode]))
    def fuzz(case):
        r = case.call(base_url=base, session=session, timeout=60)
        statuses[r.status_code] += 1
        assert r.status_code < 500, (str(case.body)[:300], r.text[:300])

    fuzz()
    return dict(statuses)


@pytest.mark.timeout(900)
def test_schema_driven_fuzz_of_every_predict_endpoint_gets_no_5xx(served):
    session = requests.Session()
    for task in ("retinopathy", "autonomous", "recsys"):
        statuses = _fuzz(f"{served['base']}/{task}", session)
        print(f"{task}: {sum(statuses.values())} generated requests, statuses {statuses}")
        assert sum(statuses.values()) >= FUZZ_EXAMPLES, statuses


def _bomb(width: int, height: int) -> bytes:
    """A PNG declaring width x height pixels in a few KB (one bit a pixel, all zero)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _replicas_rss() -> int:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline"]):
        if "ServeReplica" in " ".join(p.info["cmdline"] or []):
            total += p.memory_info().rss
    return total


@pytest.mark.timeout(300)
def test_image_bombs_are_refused_from_their_headers_while_health_answers(served):
    url = served["base"]
    bomb = _b64(_bomb(13000, 13000))
    bombs = {
        "1x20000 fundus photo": ("retinopathy", {"image": _b64(_bomb(1, 20000))}),
        "13000x13000 fundus photo": ("retinopathy", {"image": bomb}),
        "eight 13000x13000 cameras": ("autonomous", {"images": [bomb] * 8}),
    }
    assert len(bombs["eight 13000x13000 cameras"][1]["images"][0]) < 1 << 20  # each fits any body limit
    checks: list[tuple[int, float]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            tic = time.perf_counter()
            code = requests.get(f"{url}/retinopathy/health", timeout=10).status_code
            checks.append((code, time.perf_counter() - tic))
            time.sleep(0.05)

    before = _replicas_rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name, (task, body) in bombs.items():
            tic = time.perf_counter()
            r = requests.post(f"{url}/{task}/predict", json=body, timeout=60)
            took = time.perf_counter() - tic
            assert r.status_code in (413, 422) and "pixels" in r.json()["detail"], (name, r.text[:300])
            assert took < 1.0, f"{name}: {took:.2f} s"  # the bound: refused, not decoded
            print(f"{name}: {r.status_code} in {took * 1000:.0f} ms: {r.json()['detail']}")
    finally:
        stop.set()
        watcher.join()
    grown = _replicas_rss() - before
    assert grown < 100e6, f"replicas grew by {grown / 1e6:.0f} MB"
    assert checks and all(code == 200 and t < 1.0 for code, t in checks), checks


@pytest.mark.timeout(300)
def test_a_chunked_body_over_the_limit_gets_413_without_being_read_whole(served):
    """64 MiB sent chunked (no Content-Length) to an 8 MiB endpoint: counted as it streams."""
    import select

    limit = served["config"]["applications"][0]["args"]["max_body_bytes"]
    head = b"POST /retinopathy/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"A" * (1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", served["config"]["http_options"]["port"]), timeout=30) as s:
        s.sendall(head)
        while sent < 64 << 20 and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
        reply = s.recv(65536)
    print(f"413 after {sent >> 20} MiB sent (limit {limit >> 20} MiB)")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    # what the server read, in its own words: the client's count also holds what the socket
    # buffers and HAProxy had taken in before the 413 came back (26 MiB seen on a loaded machine)
    read = re.search(rb"request body of (\d+)\+ bytes sent so far is over the limit", reply)
    assert read and limit < int(read[1]) <= limit + (2 << 20), reply[-300:]


def _share(result: dict, version: str) -> float:
    ok = sum(v for k, v in result["versions"].items() if k != "None")
    return 100 * result["versions"].get(version, 0) / ok


@pytest.mark.timeout(600)
def test_canary_weights_hold_and_move_without_dropping_requests(served):
    from jobs.serve import dashboard_url, set_canary
    from serve import load

    url = f"{served['base']}/retinopathy/predict"
    bodies = [{"image": _b64(png)} for png in _test_images(served["data"]["retinopathy"], 8)]
    first = load.run(url, bodies, concurrency=8, total=1000)
    assert first["errors"] == 0 and first["requests"] == 1000, first["statuses"]
    assert abs(_share(first, "v2") - 10) <= 5, first["versions"]

    # move to 50/50 while 8 clients keep sending: no request fails, the new share takes over
    moved: dict = {}
    clients = threading.Thread(
        target=lambda: moved.update(load.run(url, bodies, concurrency=8, duration_s=25))
    )
    clients.start()
    time.sleep(3)
    tic = time.perf_counter()
    set_canary(dashboard_url(), "retinopathy", 50, progress=lambda _: None)
    took = time.perf_counter() - tic
    clients.join()
    assert moved["errors"] == 0, moved["statuses"]
    after = [v for t, _, v in moved["timeline"] if t > 3 + took + 2]
    share = 100 * after.count("v2") / len(after)
    print(f"moved in {took:.1f} s; v2 share afterwards {share:.1f}% of {len(after)}")
    assert len(after) >= 100 and abs(share - 50) <= 10

    # roll back: every request goes to v1 again
    set_canary(dashboard_url(), "retinopathy", 0, progress=lambda _: None)
    back = load.run(url, bodies, concurrency=4, total=100)
    assert back["versions"] == {"v1": 100}
    health = requests.get(f"{served['base']}/retinopathy/health").json()
    assert health["versions"]["v2"]["traffic_percent"] == 0


@pytest.mark.timeout(600)
def test_drift_score_rises_for_shifted_inputs_only(served):
    from jobs.serve import dashboard_url, set_canary
    from serve import load

    set_canary(dashboard_url(), "retinopathy", 0, progress=lambda _: None)  # one window: v1's
    url = f"{served['base']}/retinopathy/predict"
    window = served["config"]["applications"][0]["args"]["drift"]["window"]
    pngs = _test_images(served["data"]["retinopathy"], window + 50)
    like_training = [{"image": _b64(png)} for png in pngs]

    def shifted(png: bytes) -> dict:  # a darker, bluer camera: another clinic's fundus photos
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
        rgb = np.clip(rgb * [0.55, 0.7, 1.6] + [0, 0, 25], 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return {"image": _b64(buf.getvalue())}

    def drift() -> dict:
        return requests.get(f"{served['base']}/retinopathy/drift", timeout=30).json()["versions"]["v1"]

    assert load.run(url, like_training, concurrency=8, total=window + 50)["errors"] == 0
    calm = drift()
    assert calm["rows"] == window and calm["score"] is not None and calm["score"] < 0.2, calm
    assert load.run(url, [shifted(p) for p in pngs], concurrency=8, total=window + 50)["errors"] == 0
    drifted = drift()
    print(f"drift: like training {calm['score']:.3f}, shifted {drifted['score']:.3f}: {drifted['features']}")
    assert drifted["score"] > 0.2 and drifted["drifted"], drifted


@pytest.mark.timeout(300)
def test_prometheus_metrics_carry_the_answering_version(served, ray_local):
    """Request counts, latency, batch sizes and drift leave through Ray's metrics export."""
    node = ray_local._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wanted = ("deepfleet_requests", "deepfleet_latency_ms", "deepfleet_batch_size", "deepfleet_drift_score")
    deadline, text = time.monotonic() + 120, ""
    while time.monotonic() < deadline:  # Ray exports every few seconds
        text = requests.get(url, timeout=10).text
        if all(w in text for w in wanted) and 'version="v2"' in text:
            break
        time.sleep(3)
    lines = [ln for ln in text.splitlines() if "deepfleet_" in ln and not ln.startswith("#")]
    print("\n".join(lines[:12]))
    for w in wanted:
        assert any(w in ln for ln in lines), w
    ok = [ln for ln in lines if "deepfleet_requests" in ln and 'status="ok"' in ln]
    assert any('version="v1"' in ln and 'task="retinopathy"' in ln for ln in ok), ok
    assert any('version="v2"' in ln for ln in ok), ok
    assert any('status="client_error"' in ln for ln in lines)


@pytest.mark.timeout(600)
def test_batching_raises_throughput(served):
    """16 closed-loop clients, batch size 1 against 16 on one model replica, moved in place; the
    README's number comes from `python -m jobs.bench.serving` (20 s each); this is a short, loose check."""
    from jobs.bench.serving import batching_gain
    from jobs.serve import dashboard_url, set_canary

    set_canary(dashboard_url(), "retinopathy", 0, progress=lambda _: None)
    bodies = [{"image": _b64(png)} for png in _test_images(served["data"]["retinopathy"], 16)]
    result = batching_gain(
        dashboard_url(),
        f"{served['base']}/retinopathy",
        "retinopathy",
        "v1",
        bodies,
        duration_s=8,
        warmup_s=2,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=1))
    assert result["unbatched"]["errors"] == 0 and result["batched"]["errors"] == 0
    assert result["throughput_ratio"] >= 1.2, result

    # one version: its batching lives on the ingress that holds it; a change keeps the other keys
    from jobs.serve import set_batching

    details = set_batching(
        dashboard_url(), "autonomous", "v1", {"max_batch_size": 2}, progress=lambda _: None
    )
    ingress = details["applications"]["autonomous"]["deployments"]["ingress"]
    assert ingress["deployment_config"]["user_config"] == {
        "canary_percent": 0,
        "max_batch_size": 2,
        "batch_wait_timeout_s": 0.01,
    }


@pytest.mark.timeout(120)
def test_serve_config_is_validated_strictly(tmp_path):
    from jobs.errors import UserError
    from jobs.serve import load

    config = load(SERVE_CONFIG)
    assert [a["name"] for a in config["applications"]] == ["retinopathy", "autonomous", "recsys"]
    broken = yaml.safe_load(SERVE_CONFIG.read_text())
    broken["applications"][0]["args"]["batching"]["max_batch_sise"] = 8
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(UserError, match=r"args\.batching\.max_batch_sise"):
        load(tmp_path / "a.yaml")
    broken = yaml.safe_load(SERVE_CONFIG.read_text())
    broken["applications"][1]["deployments"] = [{"name": "ingress", "max_ongoing_request": 3}]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(UserError, match="unknown key 'max_ongoing_request'"):
        load(tmp_path / "b.yaml")
    broken = yaml.safe_load(SERVE_CONFIG.read_text())
    broken["applications"][2]["deployments"] = [{"name": "model-v1", "user_config": {"max_batch_size": 8}}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(UserError, match="'model-v1' exists only during a canary release"):
        load(tmp_path / "c.yaml")


@pytest.mark.timeout(120)
def test_serve_without_a_production_model_is_one_line(tmp_path):
    line = one_line_error(deepfleet("serve", "--registry", str(tmp_path / "empty")))
    assert "no model in production" in line
    line = one_line_error(deepfleet("serve", "--config", str(tmp_path / "missing.yaml")))
    assert "no Serve config" in line


@pytest.mark.timeout(600)
def test_bench_serve_section_measures_against_a_bare_server(served, tmp_path):
    """`deepfleet bench --section serve --quick` on the registered model (last: it replaces the
    module's applications with its own)."""
    from jobs.bench import serving
    from jobs.registry import Registry

    registry = Registry(tmp_path / "serve" / "registry")
    entry = registry.register(served["models"]["retinopathy"], test_metrics={}, lineage={"bench": "test"})
    registry.set_stage("retinopathy", entry["version"], "production", "test")
    result = serving.run(["retinopathy"], quick=True, work_dir=tmp_path / "serve", progress=print)
    print(json.dumps({k: v for k, v in result.items() if k != "cells"}, indent=1))
    assert result["errors"] == 0
    for server, cells in result["cells"].items():
        assert set(cells) == {"1", "8", "32"} and all(c["requests_per_s"] > 0 for c in cells.values()), server
    assert np.isfinite(result["overhead_p50_ms_at_1"]) and result["batching_gain_at_32"] >= 1.2
    assert {t["name"] for t in serving.targets(result)} >= {"batching throughput gain at 32 clients"}
