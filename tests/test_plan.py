"""deepfleet plan: parameters, ZeRO model states, measured activations, GPUs needed, check_fits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from jobs import tasks
from jobs.cli import app
from jobs.config import load_recipe
from jobs.errors import UserError
from jobs.plan import GB, activations, check_fits, model_states, plan
from tests.conftest import CONFIGS

P, L = 10**9, 10**7  # parameters, largest layer


def recipe(task: str, profile: str, *sets: str):
    return load_recipe(CONFIGS / f"{task}.yaml", profile, list(sets))


def gpu(stage: int, offload: str = "none", world: int = 8, largest: int = L) -> float:
    return sum(model_states(P, P, largest, stage, offload, world)["gpu"].values())


@pytest.mark.timeout(120)
def test_parameters_of_the_full_grader_match_the_real_model():
    from deepspeed.runtime.zero.stage3 import model_to_params

    r = recipe("retinopathy", "full")
    p = plan(r)
    real = tasks.build_model(r)
    assert p["parameters"]["total"] == sum(q.numel() for q in real.parameters()) > 20_000_000
    assert p["parameters"]["trainable"] == p["parameters"]["total"]
    assert (p["parameters"]["total"], p["parameters"]["largest_layer"]) == model_to_params(real)
    frozen = plan(recipe("retinopathy", "full", "model.freeze=early"))["parameters"]
    assert frozen["trainable"] < frozen["total"] == p["parameters"]["total"]


@pytest.mark.timeout(30)
def test_zero_stages_split_what_they_claim_and_offload_moves_it_to_the_host():
    assert gpu(0) == 16 * P  # fp32 weights, gradients, AdamW's two moments, on every GPU
    # stage 3 splits all of stage 0's share over 8 GPUs; only the gathered layer is whole
    assert gpu(3) - 8 * L == pytest.approx(16 * P / 8)
    assert gpu(2) == pytest.approx(4 * P + 16 * P / 8)  # weights whole, the fp32 master split
    assert gpu(1) == pytest.approx(8 * P + 12 * P / 8)
    states = model_states(P, P, L, 2, "cpu", 8)
    assert states["gpu"]["optimizer"] == states["gpu"]["gradients"] == 0
    assert states["host"]["optimizer"] == pytest.approx(12 * P / 8)  # master + AdamW, this rank's share
    offloaded3 = model_states(P, P, L, 3, "cpu", 8)
    assert sum(offloaded3["gpu"].values()) == 8 * L
    assert sum(offloaded3["host"].values()) == pytest.approx(20 * P / 8)
    assert model_states(P, P, L, 0, "cpu", 8) == model_states(P, P, L, 0, "none", 8)  # no ZeRO, no offload
    # frozen weights are kept, but have neither gradients nor optimizer states
    assert sum(model_states(P, P // 2, L, 0, "none", 1)["gpu"].values()) == 4 * P + 12 * P // 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 4, 8, 64])
def test_agrees_with_deepspeeds_estimators_once_weights_are_fp32(world):
    """DeepSpeed's estimators assume 2-byte weights (fp16/bf16 engines); this engine keeps them
    fp32 under torch autocast. Each difference is one named correction (jobs.plan.model_states)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    n = world

    def host(stage: int) -> float:  # a node of `world` GPUs
        return sum(model_states(P, P, L, stage, "cpu", n)["host"].values()) * n

    # ZeRO 2: +2 bytes of every (whole) weight, -2 of the 2-byte gradient copy that does not exist
    _, ds = zero2(P, num_gpus_per_node=n, cpu_offload=False, additional_buffer_factor=1)
    assert gpu(2, world=n) == pytest.approx(ds + 2 * P - 2 * P / n)
    ds_cpu, ds = zero2(P, num_gpus_per_node=n, cpu_offload=True, additional_buffer_factor=1)
    assert gpu(2, "cpu", n) == pytest.approx(ds + 2 * P)
    if 4 * n <= 16:  # beyond, DeepSpeed counts a whole fp32 model per GPU of the node instead
        assert host(2) == pytest.approx(ds_cpu)  # fp32 gradients, master and AdamW: no 2-byte part
    # ZeRO 3: the gathered layer's weights and gradients are 4 bytes, not 2; without offload no
    # separate fp32 master (DeepSpeed steps the fp32 weights in place), with it 4-byte weights
    _, ds, _ = zero3(P, L, num_gpus_per_node=n, cpu_offload=False, additional_buffer_factor=1)
    assert gpu(3, world=n) == pytest.approx(ds + 4 * L - 2 * P / n)
    ds_cpu, ds, _ = zero3(P, L, num_gpus_per_node=n, cpu_offload=True, additional_buffer_factor=1)
    assert gpu(3, "cpu", n) == pytest.approx(ds + 4 * L)
    assert host(3) == pytest.approx(ds_cpu + 2 * P)


@pytest.mark.timeout(120)
def test_activations_are_measured_halve_in_bf16_and_grow_with_the_image():
    def per_sample(*sets: str) -> float:
        return plan(recipe("retinopathy", "tiny", *sets))["activations"]["per_sample"]

    fp32, bf16 = per_sample("train.dtype=fp32"), per_sample("train.dtype=bf16")
    assert fp32 > 0 and 0.4 < bf16 / fp32 < 0.65
    assert per_sample("train.dtype=fp32", "data.image_size=192") > 3.5 * fp32  # 4x the pixels


@pytest.mark.timeout(120)
def test_fake_tensors_save_what_real_ones_do(monkeypatch):
    """The plan runs the model on fake tensors; where they fail it runs real ones on the CPU,
    and those save as much."""
    import torch._subclasses.fake_tensor as fake

    r = recipe("retinopathy", "tiny")

    def measure(bf16: bool) -> dict:
        with torch.device("meta"):
            return activations(tasks.build_model(r), r, bf16)

    faked = [measure(bf16) for bf16 in (False, True)]

    def unsupported(*args, **kwargs):
        raise NotImplementedError("an operator fake tensors lack")

    monkeypatch.setattr(fake, "FakeTensorMode", unsupported)
    real = [measure(bf16) for bf16 in (False, True)]
    assert [m["measured_on"] for m in faked + real] == ["fake tensors"] * 2 + ["cpu"] * 2
    assert real[0]["per_sample"] == faked[0]["per_sample"] > 0  # fp32: to the byte
    # bf16: the CPU's autocast kernels save a few KB more (0.1% here)
    assert real[1]["per_sample"] == pytest.approx(faked[1]["per_sample"], rel=0.01)


@pytest.mark.timeout(180)
def test_gpus_needed_and_check_fits():
    p = plan(recipe("autonomous", "zero3"))
    assert p["zero_stage"] == 3 and p["offload"] == "cpu" and p["parameters"]["total"] > 500_000_000
    assert p["fits"] and p["gpus_needed"] <= p["world"] == 8
    assert p["activations"]["per_sample"] > 1 * GB  # 8 camera images at 256 x 448 px

    r = recipe("retinopathy", "full")
    check_fits(r, 80 * GB, 512 * GB)
    with pytest.raises(UserError) as e:
        check_fits(r, 2 * GB, None)
    line = str(e.value)
    assert "\n" not in line and "per GPU at ZeRO 2 over 8 GPUs" in line and "at batch 64" in line
    # activations fill it: a smaller batch helps, ZeRO 3 would not
    assert re.search(r"but the GPUs have 2\.0 GB: use train\.batch_size \d+ or less$", line)
    # model states fill it: ZeRO 3 and offload help, as do more workers
    with pytest.raises(
        UserError,
        match=r"at ZeRO 2 over 2 GPUs .* use train\.zero_stage 3, train\.offload cpu or \d+ workers$",
    ):
        check_fits(recipe("autonomous", "full", "scaling.num_workers=2", "train.batch_size=1"), 8 * GB, None)
    with pytest.raises(UserError, match=r"GB of host memory per node .* but the nodes have 0\.5 GB"):
        check_fits(recipe("retinopathy", "full", "train.offload=cpu"), None, 0.5 * GB)
    check_fits(r, None, None)  # nothing known, nothing measured


@pytest.mark.timeout(120)
def test_recsys_needs_its_data_for_the_catalogue_and_feature_sizes(tmp_path):
    runner = CliRunner()
    empty = runner.invoke(
        app, ["plan", str(CONFIGS / "recsys.yaml"), "-p", "zero3", "-s", f"data.root={tmp_path}"]
    )
    assert empty.exit_code == 1 and "deepfleet prepare" in empty.output
    root = tmp_path / "data"
    tasks.get("recsys").prepare(recipe("recsys", "tiny", f"data.root={root}"))
    p = plan(recipe("recsys", "zero3", f"data.root={root}"))
    # the full 4M x 128 table (configs/recsys.yaml), not the tiny catalogue: ZeRO 3 gathers it whole
    assert p["parameters"]["largest_layer"] == 4_000_001 * 128
    assert p["gpu"]["gathered layer"] == 8 * 4_000_001 * 128


@pytest.mark.timeout(120)
def test_cli_prints_the_plan_and_one_line_for_a_bad_profile():
    runner = CliRunner()
    config = str(CONFIGS / "retinopathy.yaml")
    result = runner.invoke(app, ["plan", config, "--profile", "tiny", "--gpu-memory", "24"])
    assert result.exit_code == 0, result.output
    assert "GB per GPU at ZeRO 2 over 2 GPUs" in result.output and "activations" in result.output
    assert "GPUs of 24 GB: needs at least 1; the recipe's 2 workers fit" in result.output
    as_json = runner.invoke(app, ["plan", config, "--profile", "tiny", "--json"])
    assert json.loads(as_json.output)["parameters"]["total"] > 0
    bad = runner.invoke(app, ["plan", config, "--profile", "huge"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert [ln for ln in bad.output.splitlines() if ln.strip()] == [
        f"error: {config}: no profile 'huge' (profiles: tiny, full, resnet50)"
    ]
