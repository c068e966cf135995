"""One Ray cluster for the whole session; tiny recipes; every test has a timeout (pyproject).

Each task's tiny recipe is trained once per session, as it ships (session fixtures below): its
own module checks that it learns, exports and resumes; test_serve serves the same exports. A
fit costs ~30 s of fixed start-up on 2 cores before its first step, so the suite trains each
recipe once rather than once per module that needs a trained model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Secrets in the environment of this process and of every cluster it starts (set before any
# starts): the served plugin's API key; test_tune's last test finds none of them in a file.
SECRETS = {"DEEPFLEET_TEST_API_KEY": f"key-{os.urandom(16).hex()}"}
os.environ.update(SECRETS)

PLUGINS = ROOT / "tests" / "plugins"
PLUGIN_SITE = pytest.StashKey[Path]()


def pytest_sessionstart(session):
    """Install the task packages under tests/plugins as a user installs theirs: pip (no network,
    no dependencies) into a folder that this process and every process of the session's clusters
    have on their path (PYTHONPATH reaches Ray's workers through the raylet), before anything
    lists deepfleet's tasks. deepfleet finds them through their `deepfleet.tasks` entry points."""
    site = Path(tempfile.mkdtemp(prefix="deepfleet-plugins-"))
    session.config.stash[PLUGIN_SITE] = site
    for package in sorted(p.parent for p in PLUGINS.glob("*/pyproject.toml")):
        source = shutil.copytree(package, site / "src" / package.name)  # builds write into the source
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        subprocess.run([*pip, "--no-index", "--target", str(site / "lib"), str(source)], check=True)
    sys.path.insert(0, str(site / "lib"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site / "lib"), os.environ.get("PYTHONPATH")])
    )


def cli_env() -> dict[str, str]:
    """The environment of a `deepfleet` subprocess: this checkout and the session's task plugins
    on its path, a wide console."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


def pytest_sessionfinish(session):
    shutil.rmtree(session.config.stash[PLUGIN_SITE], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from cluster.local import connect

    connect()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny retinopathy recipe's data, generated once per session."""
    from jobs import tasks
    from jobs.config import load_recipe

    root = tmp_path_factory.mktemp("data") / "retinopathy-tiny"
    recipe = load_recipe(CONFIGS / "retinopathy.yaml", "tiny", [f"data.root={root}"])
    tasks.get("retinopathy").prepare(recipe)
    return root


S3_BUCKET = "deepfleet-test"


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server on loopback (moto in server mode, in this process's threads) and
    the standard AWS variables pointing at it, as boto3 and pyarrow read them; `deepfleet`
    subprocesses started meanwhile inherit them. Yields the bucket's s3:// URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "deepfleet-test",
        "AWS_SECRET_ACCESS_KEY": f"secret-{os.urandom(8).hex()}",  # a file holding it is a leak
        "AWS_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:  # the variables go back as they were afterwards
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    server.stop()


def _tiny(task: str, *sets: str):
    from jobs.config import load_recipe

    return load_recipe(CONFIGS / f"{task}.yaml", "tiny", list(sets))


@pytest.fixture(scope="session")
def retinopathy_cli(ray_local, tiny_data, tmp_path_factory) -> dict:
    """The README's main job as a user runs it: `deepfleet train configs/retinopathy.yaml --profile
    tiny` (2 workers, ZeRO 2), whole, a fresh run joined to the session's cluster. Its summary
    (summary.json) and everything it printed (test_console reads that)."""
    out = tmp_path_factory.mktemp("runs")
    recipe = _tiny("retinopathy", f"data.root={tiny_data}", f"run.output_dir={out}")
    assert recipe.scaling.num_workers == 2 and recipe.train.zero_stage == 2
    cmd = [sys.executable, "-m", "jobs.cli", "train", str(CONFIGS / "retinopathy.yaml"), "--profile", "tiny"]
    cmd += ["--set", f"data.root={tiny_data}", "--output-dir", str(out)]
    cmd += ["--address", ray_local.get_runtime_context().gcs_address]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=cli_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((recipe.run_dir / "summary.json").read_text())
    return {"summary": summary, "console": proc.stdout + proc.stderr, "run_dir": recipe.run_dir}


@pytest.fixture(scope="session")
def retinopathy_run(retinopathy_cli) -> dict:
    """The summary of the README's main job (retinopathy_cli)."""
    return retinopathy_cli["summary"]


@pytest.fixture(scope="session")
def autonomous_run(ray_local, tmp_path_factory) -> dict:
    """`deepfleet train configs/autonomous.yaml --profile tiny --set train.dtype=bf16` (2 workers,
    ZeRO 2): its learning bars hold in bf16. dtype auto keeps fp32 for this task on a CPU (bf16
    is no faster there); where the CPU has no native bf16 this is the fp32 run."""
    from jobs.train import train

    root = tmp_path_factory.mktemp("data") / "autonomous-tiny"
    recipe = _tiny(
        "autonomous",
        f"data.root={root}",
        f"run.output_dir={tmp_path_factory.mktemp('runs')}",
        f"train.dtype={native_dtype()}",
    )
    assert recipe.scaling.num_workers == 2 and recipe.train.zero_stage == 2
    return train(recipe)


@pytest.fixture(scope="session")
def recsys_run(ray_local, tmp_path_factory) -> dict:
    """`deepfleet train configs/recsys.yaml --profile tiny --set train.zero_stage=3 --set
    train.offload=cpu` (2 workers, dtype auto: bf16 on a CPU with native bf16): data, hybrid fit,
    MF sibling fit (the same engine settings), export. The shipped ZeRO 2 runs in test_profiles."""
    from jobs.train import train

    root = tmp_path_factory.mktemp("recsys-data") / "tiny"
    out = tmp_path_factory.mktemp("recsys-runs")
    recipe = _tiny("recsys", f"data.root={root}", f"run.output_dir={out}", *RECSYS_OFFLOAD)
    assert recipe.scaling.num_workers == 2 and recipe.train.offload == "cpu" and not recipe.scaling.use_gpu
    tic = time.perf_counter()
    summary = train(recipe)
    summary["test_wall_s"] = time.perf_counter() - tic
    return summary


RECSYS_OFFLOAD = ("train.zero_stage=3", "train.offload=cpu")


def native_dtype() -> str:
    """bf16 where this CPU computes it natively, else fp32 (the engine refuses bf16 there)."""
    from jobs.worker import native_bf16

    return "bf16" if native_bf16() else "fp32"
