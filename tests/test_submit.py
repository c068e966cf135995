"""The same job, unchanged, through `ray job submit` against a head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The head runs with Ray's token authentication (~/.ray/auth_token); the `ray job` CLI only
# sends the token when told the cluster uses it.
CLI_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """A real Ray head on loopback with its own ports and temp dir; stopped (its process group) after."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = (_free_port() for _ in range(7))
    temp = Path("/tmp") / f"rayhead-{os.getpid()}"  # short: unix socket paths have a length limit
    # a fresh machine may have no token yet; this creates one only if none exists (output kept out of logs)
    subprocess.run([ray_bin, "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-port={dash}",
            # the session's embedded cluster already holds Ray's default agent ports
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=CLI_ENV,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run(
            [ray_bin, "job", "list", "--address", address], capture_output=True, timeout=60, env=CLI_ENV
        )
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        pytest.fail("ray head did not come up")
    yield ray_bin, address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_training_job(ray_head, tiny_data, tmp_path):
    ray_bin, address = ray_head
    out = tmp_path / "runs"
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--"]
    cmd += [
        "python",
        "-m",
        "jobs.train",
        "configs/retinopathy.yaml",
        "--profile",
        "tiny",
        "--set",
        "train.max_steps=6",
    ]
    cmd += ["--set", f"data.root={tiny_data}", "--output-dir", str(out), "--name", "job"]
    for _ in range(30):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=ROOT, env=CLI_ENV)
        # a just-started head answers the jobs API before its node's agent is up: no job was made, so retry
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    summary = json.loads((out / "job" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2
    assert Path(summary["paths"]["model"], "model.safetensors").is_file()
