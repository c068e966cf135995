"""`deepfleet submit` against a real two-node Ray cluster on loopback (`ray start --head` plus a second
raylet joined to it): the Train workers run on both nodes, losing the second node mid-run makes Ray
Train restore them from the last checkpoint, and the run lands where the docs say. An address where
no cluster runs fails in seconds with one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The nodes run with Ray's token authentication (~/.ray/auth_token); the `ray` CLI only sends the
# token when told the cluster uses it. `deepfleet submit` sends it by itself.
CLI_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open together, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so the test can stop (or kill) all of it."""
    with log.open("w") as f:
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=CLI_ENV,
        )


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _node_ports() -> list[str]:
    """Ports every node of a second cluster needs of its own: the pytest session's embedded cluster
    holds Ray's defaults. Worker ports come from a range outside both the defaults and the kernel's
    ephemeral range (which _free_ports draws from)."""
    agent, agent_grpc, env_agent, metrics, node_manager, object_manager = _free_ports(6)
    return [
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
    ]


def _state(address: str, kind: str) -> list[dict]:
    """Ray's state API over HTTP (`ray list` costs seconds of CPU per call): nodes, actors, ..."""
    from jobs.submit import auth_headers

    request = urllib.request.Request(f"{address}/api/v0/{kind}?limit=10000", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):  # not up yet
        return []


@pytest.fixture
def two_nodes(tmp_path):
    """A Ray head (4 CPUs, able to host both workers alone) and a second raylet (2 CPUs) on loopback,
    with their own ports and temp dir; yields (dashboard address, second node's process)."""
    # a fresh machine may have no token yet; this creates one only if none exists (output kept out of logs)
    subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
    gcs, dash, client = _free_ports(3)
    temp = Path("/tmp") / f"raytwo-{os.getpid()}"  # short: unix socket paths have a length limit
    head = _start(
        [
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            *_node_ports(),
            "--min-worker-port=21000",
            "--max-worker-port=21299",
            "--num-cpus=4",
            "--object-store-memory=500000000",
            f"--temp-dir={temp}",
        ],
        tmp_path / "head.log",
    )
    address, procs = f"http://127.0.0.1:{dash}", [head]
    try:
        deadline = time.time() + 240  # a loaded 2-core machine takes minutes
        while len(_state(address, "nodes")) < 1:
            assert time.time() < deadline, "the Ray head did not come up:\n" + _tail(tmp_path / "head.log")
            time.sleep(2)
        worker = _start(
            [
                f"--address=127.0.0.1:{gcs}",
                *_node_ports(),
                "--min-worker-port=21300",
                "--max-worker-port=21599",
                "--num-cpus=2",
                "--object-store-memory=500000000",
            ],
            tmp_path / "worker.log",
        )
        procs.append(worker)
        deadline = time.time() + 180
        while sum(n["state"] == "ALIVE" for n in _state(address, "nodes")) < 2:
            assert time.time() < deadline, "the second raylet did not join:\n" + _tail(
                tmp_path / "worker.log"
            )
            time.sleep(2)
        yield address, worker
    finally:
        for proc in reversed(procs):
            _stop(proc)
        # Ray's own logs (raylets, GCS, agents) stay beside the test's for a post-mortem
        shutil.copytree(
            temp / "session_latest" / "logs", tmp_path / "ray-logs", dirs_exist_ok=True, symlinks=True
        )
        shutil.rmtree(temp, ignore_errors=True)


def _train_worker_nodes(address: str) -> set[str]:
    actors = _state(address, "actors")
    return {a["node_id"] for a in actors if a["state"] == "ALIVE" and a["class_name"].endswith("TrainWorker")}


@pytest.mark.timeout(900)  # node start-up, the run and shutdown: ~5 min on 2 cores, more when loaded
def test_submit_runs_on_two_nodes_and_survives_losing_one(two_nodes, tiny_data, tmp_path):
    address, worker_node = two_nodes
    out = tmp_path / "runs"
    run_dir = out / "job"
    cmd = [sys.executable, "-m", "jobs.submit", "--address", address, "--"]
    cmd += [
        "train",
        "configs/retinopathy.yaml",
        "--profile",
        "tiny",
        "--output-dir",
        str(out),
        "--name",
        "job",
    ]
    # SPREAD: one worker per node; checkpoints every 4 steps, so the loss costs at most 4 steps
    for s in ["train.max_steps=24", "train.checkpoint_every=4", "scaling.placement_strategy=SPREAD"]:
        cmd += ["--set", s]
    cmd += ["--set", f"data.root={tiny_data}"]
    # token authentication: a wrong token is one line, before anything is uploaded
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}
    wrong = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert wrong.returncode == 1 and "did not accept this machine's token" in wrong.stderr, wrong.stderr
    assert "not-the-token" not in wrong.stdout + wrong.stderr
    log = tmp_path / "submit.log"
    tic = time.time()
    with log.open("w") as f:
        submit = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill the second raylet once two checkpoints exist: the first is then committed, and a
        # worker on that node is lost mid-run (the node's workers die with their raylet).
        nodes: set[str] = set()
        while len(list(run_dir.glob("checkpoint_*"))) < 2:
            assert submit.poll() is None, _tail(log, 5000)
            assert time.time() - tic < 450, "no second checkpoint in 450 s\n" + _tail(log, 5000)
            nodes = nodes if len(nodes) == 2 else _train_worker_nodes(address)
            time.sleep(1)
        assert len(nodes) == 2, f"Train workers on {len(nodes)} node(s), expected one on each"
        _stop(worker_node, signal.SIGKILL)
        killed_at = time.time() - tic
        rc = submit.wait(timeout=360)
    finally:
        if submit.poll() is None:
            submit.kill()
    text = log.read_text()
    print(f"second raylet killed at {killed_at:.0f} s; job done at {time.time() - tic:.0f} s")
    assert rc == 0 and "succeeded" in text, text[-5000:]
    assert "resumed from the checkpoint of step" in text, text[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2
    # restored from a checkpoint (at-least-once: the last committed one, a multiple of 4) and finished
    assert summary["restores"] and all(s % 4 == 0 and 0 < s < 24 for s in summary["restores"]), summary
    assert Path(summary["paths"]["model"], "model.safetensors").is_file()
    # no step skipped: every progress line (each log_every = 5 steps, and the last) is there
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    assert {5, 10, 15, 20, 24} <= {ln["step"] for ln in lines if ln.get("kind") == "train"}
