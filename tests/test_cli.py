"""Mistakes a user can make: one clear line on stderr, a non-zero exit, never a stack trace."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, cli_env

RECIPE = str(CONFIGS / "retinopathy.yaml")


def deepfleet(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.timeout(120)
def test_unknown_config_key_is_named_with_close_valid_keys():
    line = one_line_error(deepfleet("train", RECIPE, "--profile", "tiny", "--set", "train.lrr=0.1"))
    assert "unknown config key 'train.lrr'" in line and "train.lr" in line
    line = one_line_error(deepfleet("train", RECIPE, "--profile", "tiny", "--set", "trian.epochs=1"))
    assert "'trian'" in line and "train" in line


@pytest.mark.timeout(120)
def test_bad_values_profiles_and_files():
    assert "zero_stage" in one_line_error(
        deepfleet("train", RECIPE, "--profile", "tiny", "--set", "train.zero_stage=4")
    )
    assert "no profile 'huge'" in one_line_error(deepfleet("train", RECIPE, "--profile", "huge"))
    assert "recipe not found" in one_line_error(deepfleet("train", "configs/nope.yaml"))


@pytest.mark.timeout(120)
def test_a_dtype_the_machine_cannot_run(monkeypatch):
    line = one_line_error(deepfleet("train", RECIPE, "--profile", "tiny", "--set", "train.dtype=fp16"))
    assert "train.dtype" in line and "bf16" in line  # fp16 is gone: bf16 is the reduced precision
    # a CPU without native bf16 (this one has it, so its answer is replaced): refused before any
    # worker starts, while auto falls back to fp32 there
    import jobs.worker
    from jobs.config import load_recipe
    from jobs.errors import UserError
    from jobs.train import check_recipe

    monkeypatch.setattr(jobs.worker, "native_bf16", lambda: False)
    with pytest.raises(UserError, match="train.dtype bf16: this CPU .* has no native bf16"):
        check_recipe(load_recipe(RECIPE, "tiny", ["train.dtype=bf16"]), embedded=True)
    assert jobs.worker.resolve_dtype("auto", use_gpu=False, task="retinopathy") == "fp32"


@pytest.mark.timeout(120)
def test_missing_data_path(tmp_path):
    line = one_line_error(
        deepfleet(
            "train",
            RECIPE,
            "--profile",
            "tiny",
            "--set",
            "data.source=eyepacs",
            "--set",
            f"data.import_path={tmp_path / 'nowhere'}",
            "--set",
            f"data.root={tmp_path / 'shards'}",
        )
    )
    assert "nowhere" in line


@pytest.mark.timeout(120)
def test_object_storage_uris_are_refused_before_anything_is_written(tmp_path):
    """A bucket URI is not yet read or written (issue 21): one line, and no local folder named
    `s3:` or `gs:` where the user stands."""
    line = one_line_error(
        deepfleet("train", RECIPE, "--profile", "tiny", "--set", "data.root=s3://bucket/data", cwd=tmp_path)
    )
    assert "root is s3://bucket/data: object storage is not read or written here yet" in line, line
    line = one_line_error(
        deepfleet("train", RECIPE, "--profile", "tiny", "--output-dir", "gs://b/runs", cwd=tmp_path)
    )
    assert "output_dir is gs://b/runs: object storage" in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(120)
def test_corrupt_or_truncated_shard_is_named(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    shard = sorted((root / "train").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = one_line_error(
        deepfleet(
            "train",
            RECIPE,
            "--profile",
            "tiny",
            "--set",
            f"data.root={root}",
            "--output-dir",
            str(tmp_path / "runs"),
        )
    )
    assert shard.name in line


@pytest.mark.timeout(120)
def test_images_that_do_not_decode_fail_or_are_counted(tmp_path):
    from PIL import Image

    src = tmp_path / "eyepacs"
    src.mkdir()
    rows = ["image,level"]
    for i in range(12):
        for eye in ("left", "right"):
            name = f"{i}_{eye}"
            Image.new("RGB", (40, 40), (120 + i, 40, 20)).save(src / f"{name}.jpeg")
            rows.append(f"{name},{i % 5}")
    (src / "3_left.jpeg").write_bytes(b"not a jpeg at all")
    (src / "trainLabels.csv").write_text("\n".join(rows) + "\n")
    common = (
        "--set",
        f"data.import_path={src}",
        "--set",
        "data.source=eyepacs",
        "--set",
        "data.image_size=32",
    )

    line = one_line_error(
        deepfleet(
            "prepare",
            RECIPE,
            "--profile",
            "tiny",
            *common,
            "--set",
            "data.on_bad_image=fail",
            "--set",
            f"data.root={tmp_path / 'fail'}",
        )
    )
    assert "3_left" in line

    proc = deepfleet(
        "prepare",
        RECIPE,
        "--profile",
        "tiny",
        *common,
        "--set",
        "data.on_bad_image=skip",
        "--set",
        f"data.root={tmp_path / 'skip'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1" in proc.stderr and "3_left" in proc.stderr
    manifest = __import__("json").loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["meta"]["skipped_images"] == ["3_left"]
    assert sum(s["rows"] for s in manifest["splits"].values()) == 23


@pytest.mark.timeout(240)
def test_a_recipe_that_cannot_fit_is_refused_before_any_worker_starts(tmp_path):
    """The memory plan (jobs.plan) against this machine: a 100M-row embedding table in fp32 with
    AdamW needs ~150 GB a worker; one line with the numbers, and no run starts."""
    recsys = str(CONFIGS / "recsys.yaml")
    sets = [f"data.root={tmp_path / 'data'}", "model.num_tracks=100000001", "model.embedding_dim=128"]
    args = ["train", recsys, "--profile", "tiny", "--output-dir", str(tmp_path / "runs")]
    line = one_line_error(deepfleet(*args, *[x for s in sets for x in ("--set", s)]))
    assert "recipe needs" in line and "GB per CPU worker at ZeRO 2 over 2 CPU workers" in line, line
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))  # no worker reported anything
    # ZeRO 3 with offload still gathers the whole table (one layer) in each forward: also refused
    offload = [*sets, "train.zero_stage=3", "train.offload=cpu"]
    line = one_line_error(deepfleet(*args, *[x for s in offload for x in ("--set", s)]))
    assert "at ZeRO 3 over 2 CPU workers" in line, line
