"""Run a deepfleet command as a Ray job: `deepfleet submit [--address URL] -- train CONFIG --profile NAME ...`.

The checkout is the job's working directory and the job runs `python -m jobs.cli COMMAND ...` there
(on the head node, as Ray runs job drivers). Its logs stream here and the exit status is the job's.
The runtime environment carries the user's W&B settings, never WANDB_API_KEY: a cluster that logs
online gets the key from its own environment (a Kubernetes secret, the nodes' setup).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from jobs.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # Ray's dashboard (jobs API) on this machine
# what never travels to the cluster (on top of .gitignore, which Ray also reads): anchored at the checkout
EXCLUDES = ["/.git", "/.venv", "/runs", "/data", "/registry", "/wandb", "/build", "/dist"]
EXCLUDES += ["__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
CONNECT_TIMEOUT_S = 5.0


def _address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS (as Ray's own CLI), else this machine."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    address = (address or DEFAULT_ADDRESS).rstrip("/")
    if address.startswith("ray://"):
        raise UserError(
            f"deepfleet submit talks to the Ray dashboard's jobs API: give its address "
            f"(e.g. http://head:8265), not the Ray Client address {address}"
        )
    return address if "://" in address else f"http://{address}"


def _check_reachable(address: str) -> None:
    """Fail in seconds where nothing listens (Ray's client would wait on the TCP timeout)."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster at {address}: {e.strerror or e}") from None


def auth_headers() -> dict[str, str]:
    """Ray's token authentication, from where Ray keeps the token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token). Sent as a header, so it does not depend on RAY_AUTH_MODE being set here."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _command(command: list[str]) -> list[str]:
    """The deepfleet command to run, checked here so a typo fails before anything is uploaded."""
    from typer.main import get_command

    from jobs.cli import app

    if command and command[0] == "deepfleet":  # `-- deepfleet train ...` reads naturally too
        command = command[1:]
    names = sorted(get_command(app).commands)
    runnable = [n for n in names if n != "submit"]
    if not command:
        raise UserError(
            "nothing to submit: give a deepfleet command after --, e.g. "
            "deepfleet submit -- train configs/retinopathy.yaml --profile tiny"
        )
    if command[0] not in runnable:
        raise UserError(f"unknown deepfleet command '{command[0]}' (one of: {', '.join(runnable)})")
    return command


def runtime_env(working_dir: Path) -> dict:
    from cluster.local import wandb_env

    return {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": wandb_env()}


def _client(address: str):
    _check_reachable(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # the job's own logs follow; Ray's client-side chatter (packaging, default excludes) would bury them
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)  # (the last two set INFO for themselves)

    # Ray's client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS win over its argument; ours was resolved above
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as e:
        raise UserError(
            f"the Ray cluster at {address} did not accept this machine's token ({str(e).splitlines()[0]}): "
            "put the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN (`ray get-auth-token` on its head)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def _submit(client, entrypoint: str, env: dict, submission_id: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)
        except RuntimeError as e:
            # a head that has just started answers before its job agent is up; no job was made
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise UserError(f"the cluster refused the job: {str(e).strip().splitlines()[0]}") from None
            time.sleep(2)


async def _stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _follow(client, job_id: str) -> None:
    """Print the job's logs until it ends; if the log stream breaks, wait on its status instead."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_stream(client, job_id))
    except (RuntimeError, OSError) as e:
        print(f"note: the log stream broke ({str(e).splitlines()[0]}); waiting for the job", file=sys.stderr)
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(2)


def submit(
    command: list[str], address: str | None = None, working_dir: str | Path = ".", wait: bool = True
) -> int:
    """Submit `deepfleet COMMAND ...` as a Ray job; returns the exit code (0 when the job succeeded)."""
    command = _command(command)
    working_dir = Path(working_dir).expanduser().resolve()
    if not (working_dir / "jobs" / "cli.py").is_file():
        raise UserError(
            f"{working_dir} is not a deepfleet checkout (no jobs/cli.py): run from one or pass --working-dir"
        )
    address = _address(address)
    client = _client(address)
    if command[0] in ("train", "tune") and "--output-dir" not in command:
        print(
            "note: no --output-dir: the run lands in the job's temporary working directory on the cluster;"
            " give one on storage every node sees",
            file=sys.stderr,
        )
    if os.environ.get("WANDB_API_KEY"):
        print(
            "note: WANDB_API_KEY stays on this machine; online W&B needs it on the cluster's nodes",
            file=sys.stderr,
        )

    job_id = f"deepfleet-{command[0]}-{uuid.uuid4().hex[:8]}"
    entrypoint = shlex.join(["python", "-m", "jobs.cli", *command])
    _submit(client, entrypoint, runtime_env(working_dir), job_id)
    ray = "RAY_AUTH_MODE=token ray" if auth_headers() else "ray"  # Ray's CLI sends the token only then
    follow = f"{ray} job logs --address {address} --follow {job_id}"
    stop = f"{ray} job stop --address {address} {job_id}"
    print(f"submitted {job_id} to {address}: {entrypoint}", file=sys.stderr, flush=True)
    if not wait:
        print(f"follow: {follow}\nstop:   {stop}", file=sys.stderr)
        return 0
    try:
        _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nthe job goes on: follow it with `{follow}`, stop it with `{stop}`", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded", file=sys.stderr)
        return 0
    # Ray appends "last available logs ...": they were streamed above
    reason = (info.message or "").split(", last available logs")[0].strip().splitlines()
    print(f"job {job_id} {status.lower()}: {reason[0] if reason else 'no message'}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    from jobs.cli import main as cli

    cli(["submit", *(argv or [])])


if __name__ == "__main__":
    main(sys.argv[1:])
