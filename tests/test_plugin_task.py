"""A task from outside deepfleet: the seed's text sentiment classifier, a package under
tests/plugins that registers itself through the `deepfleet.tasks` entry point (conftest installs
it with pip, as a user installs theirs on every node). It goes through deepfleet's public commands
as the built-in tasks do (prepare, train under Ray Train + DeepSpeed, tune, register, promote,
serve), joined to the session's cluster, with no line of deepfleet written for it."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from tests.conftest import SECRETS
from tests.test_cli import deepfleet, one_line_error
from tests.test_serve import _free_port


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(900)
def test_a_plugin_task_trains_tunes_registers_and_serves(ray_local, tmp_path):
    from deepfleet_sentiment import RECIPE
    from ray import serve

    from jobs import tasks
    from jobs.registry import Registry

    assert tasks.names()[-1] == "sentiment" and "sentiment" not in tasks.builtin_names()
    address = ray_local.get_runtime_context().gcs_address
    registry = tmp_path / "registry"
    common = ["--profile", "tiny", "--set", f"data.root={tmp_path / 'data'}", "--address", address]

    # train: 2 workers, ZeRO 2, the recipe as it ships; it learns the hidden rule
    _ok(deepfleet("train", str(RECIPE), *common, "--output-dir", str(tmp_path / "runs"), timeout=600))
    summary = json.loads((tmp_path / "runs" / "sentiment-tiny" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2, summary
    assert summary["metrics"]["accuracy"] >= 0.85, summary["metrics"]
    assert summary["metrics"]["accuracy"] > summary["baseline"]["accuracy"] + 0.3, summary["baseline"]

    # tune: the sweep's winner is registered as a candidate, then promoted through the gate
    sweep = [*common, "--set", f"registry.uri={registry}", "--output-dir", str(tmp_path / "sweep")]
    _ok(deepfleet("tune", str(RECIPE), *sweep, timeout=600))
    (entry,) = Registry(registry).versions("sentiment")
    assert entry["stage"] == "candidate" and entry["test_metrics"]["accuracy"] >= 0.75, entry
    _ok(
        deepfleet(
            "promote", str(RECIPE), "--profile", "tiny", "--version", entry["version"], "--stage",
            "production", "--set", f"registry.uri={registry}",
        )
    )  # fmt: skip

    # serve: the production version answers over HTTP with the plugin's own bodies, to clients
    # that carry the API key (conftest's DEEPFLEET_TEST_API_KEY); a variable that is not set is
    # refused in one line before anything deploys
    port = _free_port()
    serving = ["serve", "--task", "sentiment", "--registry", str(registry), "--address", address]
    serving += ["--port", str(port), "--api-key-env"]
    line = one_line_error(deepfleet(*serving, "DEEPFLEET_NO_SUCH_KEY"))
    assert "api_key_env names DEEPFLEET_NO_SUCH_KEY, which is not set" in line, line
    served = _ok(deepfleet(*serving, "DEEPFLEET_TEST_API_KEY"))
    try:
        url = f"http://127.0.0.1:{port}/sentiment"
        assert f"{url}/predict" in served.stdout, served.stdout
        key = {"Authorization": f"Bearer {SECRETS['DEEPFLEET_TEST_API_KEY']}"}
        praise_body = {"text": "a great catchy chorus, lovely and fresh"}
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            refused = requests.post(f"{url}/predict", json=praise_body, headers=headers, timeout=60)
            assert refused.status_code == 401 and "API key" in refused.json()["detail"], refused.text
        praise = requests.post(f"{url}/predict", json=praise_body, headers=key, timeout=60)
        complaint = requests.post(
            f"{url}/predict", json={"text": "the dull boring verse was awful"}, headers=key, timeout=60
        )
        assert praise.status_code == complaint.status_code == 200, praise.text + complaint.text
        assert praise.json()["label"] == "positive" and complaint.json()["label"] == "negative"
        assert praise.json()["version"] == entry["version"] == praise.headers["X-Model-Version"]
        bad = requests.post(f"{url}/predict", json={"text": "great", "stars": 5}, headers=key, timeout=60)
        assert bad.status_code == 422 and "stars" in bad.json()["detail"], bad.text
        assert requests.get(f"{url}/health", timeout=60).json()["status"] == "ok"  # open to probes
    finally:
        serve.shutdown()
