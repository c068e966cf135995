"""The registry under concurrent writers, cut-short writes and hostile version names: numbers are
never shared, one version is production, a half-written version is skipped, and the fetch cache
never mixes two registries up (jobs.registry, jobs.storage)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, cli_env
from tests.test_cli import deepfleet, one_line_error

# a process that registers (or moves) a model once a start file appears, so two start together
WRITER = """
import json, sys, time
from pathlib import Path
from jobs.registry import Registry
uri, start, what = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
while not start.exists():
    time.sleep(0.005)
reg = Registry(uri)
if "model" in what:
    print(json.dumps(reg.register(Path(what["model"]), test_metrics={}, lineage={"run": what["model"]})))
else:
    print(json.dumps(reg.set_stage("recsys", what["version"], "production", "at once")))
"""


def _model(folder: Path, seed: int, size: int = 4 << 20, sparse: int = 0) -> Path:
    """An exported-model folder: a card, `size` random bytes of weights, and optionally a large
    sparse file (a slow copy to cut short)."""
    from jobs.export import CARD, WEIGHTS

    folder.mkdir(parents=True)
    (folder / CARD).write_text(json.dumps({"task": "recsys", "lineage": {}}))
    (folder / WEIGHTS).write_bytes(os.urandom(size) if seed else b"")
    if sparse:
        with open(folder / "zz-blob.bin", "wb") as f:
            f.truncate(sparse)
    return folder


def _together(uri: Path, start: Path, *whats: dict) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(uri), str(start), json.dumps(w)],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for w in whats
    ]
    time.sleep(1.5)  # both have imported the registry and wait for the start file
    start.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [json.loads(out.splitlines()[-1]) for out, _ in outs]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(180)
def test_two_registrations_at_once_get_their_own_numbers_and_cards(tmp_path):
    from jobs.export import CARD, WEIGHTS
    from jobs.registry import Registry

    a, b = _model(tmp_path / "a", 1), _model(tmp_path / "b", 2)
    entries = _together(tmp_path / "registry", tmp_path / "go", {"model": str(a)}, {"model": str(b)})
    assert sorted(e["version"] for e in entries) == ["v1", "v2"]
    for version in Registry(tmp_path / "registry").versions("recsys"):
        folder = tmp_path / "registry" / "recsys" / version["version"]
        card = json.loads((folder / CARD).read_text())
        source = Path(card["lineage"]["run"])  # the model this version was registered from
        assert card["files"][WEIGHTS] == _sha(folder / WEIGHTS) == _sha(source / WEIGHTS)


@pytest.mark.timeout(180)
def test_a_registration_killed_mid_copy_is_skipped_and_the_next_one_succeeds(tmp_path):
    from jobs.errors import UserError
    from jobs.registry import STAGE, Registry

    registry = tmp_path / "registry"
    big = _model(tmp_path / "big", 1, sparse=1 << 30)  # 1 GiB of zeros to copy
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(registry), str(tmp_path / "go"), json.dumps({"model": str(big)})],
        cwd=ROOT, env=cli_env(),
    )  # fmt: skip
    (tmp_path / "go").touch()
    blob = registry / "recsys" / "v1" / "zz-blob.bin"
    deadline = time.time() + 60
    while not blob.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-copy, lock held: as the OOM killer or a lost node would
    proc.wait()
    assert blob.exists() and not (registry / "recsys" / "v1" / STAGE).exists(), "the kill came too late"

    listing = deepfleet("models", "--registry", str(registry))
    assert listing.returncode == 0, listing.stderr
    assert "v1 is incomplete" in listing.stdout, listing.stdout
    reg = Registry(registry)
    assert reg.versions("recsys") == [] and reg.incomplete("recsys") == ["v1"]
    with pytest.raises(UserError, match="no recsys model v1 \\(versions: none\\)"):
        reg.entry("recsys", "v1")
    entry = reg.register(_model(tmp_path / "next", 2), test_metrics={}, lineage={})
    assert entry["version"] == "v2" and [v["version"] for v in reg.versions("recsys")] == ["v2"]


@pytest.mark.timeout(180)
def test_two_promotions_at_once_leave_one_production_version(tmp_path):
    from jobs.registry import Registry

    reg = Registry(tmp_path / "registry")
    for i in (1, 2, 3):
        reg.register(_model(tmp_path / f"m{i}", i, size=1024), test_metrics={}, lineage={"n": i})
    reg.set_stage("recsys", "v1", "production", "first")
    _together(tmp_path / "registry", tmp_path / "go", {"version": "v2"}, {"version": "v3"})
    stages = {v["version"]: v["stage"] for v in reg.versions("recsys")}
    assert sorted(stages.values()) == ["archived", "archived", "production"], stages
    winner = reg.production("recsys")
    loser = ({"v2", "v3"} - {winner["version"]}).pop()
    assert reg.entry("recsys", loser)["history"][-1]["why"] == f"replaced by {winner['version']}"


@pytest.mark.timeout(120)
def test_a_version_that_is_not_one_is_refused_in_one_line(tmp_path):
    from jobs.errors import UserError
    from jobs.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.register(_model(tmp_path / "m", 1, size=64), test_metrics={}, lineage={})
    (tmp_path / "outside").mkdir()
    for bad in ("../../outside", "v0", "v1/../v1", "latest"):
        with pytest.raises(UserError, match="is not a registry version"):
            reg.fetch("recsys", bad)
    sets = ["--set", f"registry.uri={tmp_path / 'registry'}", "--set", f"data.root={tmp_path / 'data'}"]
    recipe = str(CONFIGS / "recsys.yaml")
    line = one_line_error(
        deepfleet("promote", recipe, "--profile", "tiny", *sets, "--version", "../x", "--stage", "production")
    )
    assert "'../x' is not a registry version (v1, v2, ...)" in line, line


def _behind_object_store(local: Path):
    """The registry at `local`, read through a non-local pyarrow filesystem, as from object
    storage: fetches copy into the cache, writers take the object-store lock."""
    from pyarrow import fs

    from jobs.registry import Registry

    remote = Registry(local)
    remote.fs, remote.root = fs.SubTreeFileSystem(str(local.parent), fs.LocalFileSystem()), local.name
    return remote


@pytest.mark.timeout(120)
def test_two_registries_v1_never_share_a_cached_copy(tmp_path):
    from jobs.errors import UserError
    from jobs.export import WEIGHTS
    from jobs.registry import Registry

    cache = tmp_path / "cache"
    fetched = {}
    for name, seed in (("one", 1), ("two", 2)):
        Registry(tmp_path / name).register(
            _model(tmp_path / f"m-{name}", seed, 4096), test_metrics={}, lineage={}
        )
        fetched[name] = _behind_object_store(tmp_path / name).fetch("recsys", "v1", cache=cache) / WEIGHTS
    assert fetched["one"] != fetched["two"]
    for name in fetched:
        assert _sha(fetched[name]) == _sha(tmp_path / name / "recsys" / "v1" / WEIGHTS)

    # a cached copy of the right size but other bytes is fetched again, not trusted
    fetched["one"].write_bytes(os.urandom(4096))
    again = _behind_object_store(tmp_path / "one").fetch("recsys", "v1", cache=cache) / WEIGHTS
    assert _sha(again) == _sha(tmp_path / "one" / "recsys" / "v1" / WEIGHTS)
    # a registry whose file no longer matches its card is named, not served
    (tmp_path / "two" / "recsys" / "v1" / WEIGHTS).write_bytes(os.urandom(4096))
    fetched["two"].unlink()
    with pytest.raises(UserError, match="does not match its card's sha256"):
        _behind_object_store(tmp_path / "two").fetch("recsys", "v1", cache=cache)


@pytest.mark.timeout(120)
def test_object_store_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    from jobs.errors import UserError
    from jobs.storage import Lock

    remote = _behind_object_store(tmp_path / "registry")
    remote.fs.create_dir("registry/recsys", recursive=True)
    path = "registry/recsys/.lock"
    held = f"registry \\(recsys\\) is in use by pid {os.getpid()} on "
    with Lock(remote.fs, path, "registry (recsys)"), pytest.raises(UserError, match=held):
        Lock(remote.fs, path, "registry (recsys)").__enter__()
    assert not (tmp_path / "registry" / "recsys" / ".lock").exists()  # released

    # a holder that died without releasing (its pid is gone from this host) is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": time.time(), "token": "x"}
    (tmp_path / "registry" / "recsys" / ".lock").write_text(json.dumps(record))
    with Lock(remote.fs, path, "registry (recsys)"):
        pass
    # and registering through the object-store path works end to end
    entry = remote.register(_model(tmp_path / "m", 1, size=64), test_metrics={}, lineage={})
    assert entry["version"] == "v1" and entry["files"]


@pytest.mark.timeout(180)
def test_the_registry_on_a_real_s3_server(s3, tmp_path):
    """Registrations at once, promotion, listing and fetching through s3:// on moto's S3 server:
    the object-store lock gives distinct numbers, fetched bytes match the card, and neither the
    endpoint's secret nor a credential put in the URI lands in an object."""
    import boto3

    from jobs.export import CARD, WEIGHTS
    from jobs.registry import Registry

    uri = f"{s3}/registry"
    a, b = _model(tmp_path / "a", 1, size=1 << 20), _model(tmp_path / "b", 2, size=1 << 20)
    entries = _together(uri, tmp_path / "go", {"model": str(a)}, {"model": str(b)})
    assert sorted(e["version"] for e in entries) == ["v1", "v2"]
    reg = Registry(uri)
    reg.set_stage("recsys", "v2", "production", "on s3")
    assert reg.production("recsys")["version"] == "v2"
    fetched = reg.fetch("recsys", "v2", cache=tmp_path / "cache")
    card = json.loads((fetched / CARD).read_text())
    assert _sha(fetched / WEIGHTS) == card["files"][WEIGHTS] == _sha(Path(card["lineage"]["run"]) / WEIGHTS)

    listing = deepfleet("models", "--registry", uri)
    assert listing.returncode == 0 and "v2" in listing.stdout, listing.stdout + listing.stderr

    # a registration through a URI that carries a credential: no object the registry writes
    # holds it (cards and stages name the registry without it), nor the endpoint's secret
    keyed = Registry(f"s3://someone:hunter2@{uri.removeprefix('s3://')}")
    assert (
        keyed.register(_model(tmp_path / "c", 3, size=1024), test_metrics={}, lineage={})["version"] == "v3"
    )
    bucket = boto3.resource("s3").Bucket(uri.removeprefix("s3://").split("/")[0])
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for obj in bucket.objects.all():
        body = obj.get()["Body"].read()
        assert secret not in body and b"hunter2" not in body, obj.key
