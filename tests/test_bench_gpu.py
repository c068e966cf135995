"""The GPU section of deepfleet bench, run on CPU workers at tiny sizes so it never rots; on a GPU
machine `deepfleet bench --section gpu` runs the full models (jobs/bench/gpu.py). Tests marked
`gpu` run the engine on CUDA and are skipped without one."""

from __future__ import annotations

import pytest
import torch

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.timeout(600)
def test_gpu_section_measures_on_cpu_workers(ray_local, tmp_path):
    if not _native():
        pytest.skip("the section trains in bf16: this CPU has no native bf16")
    from jobs.bench import gpu

    lines: list[str] = []
    tiny = (("retinopathy-tiny", "retinopathy", "tiny", ["data.num_images=300"], 8, 2),)
    result = gpu.run(["retinopathy"], False, tmp_path, lines.append, device="cpu", runs=tiny)
    r = result["runs"]["retinopathy-tiny"]
    assert r["ours"]["dtype"] == "bf16" and r["ours"]["zero_stage"] == 0  # one rank runs ZeRO 0
    assert r["ours"]["samples_per_s"] > 0 and r["plain"]["samples_per_s"] > 0 and 0.1 < r["ratio"] < 10
    assert r["ours"]["step_s"] > 0 and r["ours"]["wait_s"] >= 0
    assert r["flops_per_sample"] > 1e8 and r["mfu"] > 0  # a ResNet-10 at 96 px: ~0.4 GFLOP a sample
    assert r["plan_memory"] is None and r["ours"]["peak_memory"] is None  # GPU memory: CUDA only
    shown = [what for _, what, _ in gpu.rows(result)]
    assert any("model FLOP utilisation" in w for w in shown) and any("bf16 matmul peak" in w for w in shown)
    assert {t["name"] for t in gpu.targets(result)} >= {"retinopathy-tiny: ratio to plain PyTorch bf16"}
    assert any("MFU" in ln for ln in lines)


def _native() -> bool:
    from jobs.worker import native_bf16

    return native_bf16()


@GPU
@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_full_models_train_in_bf16_on_one_gpu(ray_local, tmp_path):
    """bf16 + NCCL on one GPU, the recipes' full models (offload for the zero3 profile), a few
    steps each under the engine, and their peak memory against the plan."""
    from jobs.bench import gpu

    short = tuple((n, t, p, sets, 8, 2) for n, t, p, sets, _, _ in gpu.RUNS)
    result = gpu.run(
        ["retinopathy", "autonomous", "recsys"], True, tmp_path, print, device="cuda", runs=short
    )
    for name, r in result["runs"].items():
        assert r["ours"]["dtype"] == "bf16" and r["ours"]["device"].startswith("cuda"), name
        assert r["ours"]["samples_per_s"] > 0 and r["ours"]["peak_memory"], name


@GPU
@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_tiny_recipe_exports_from_a_gpu_run(ray_local, tmp_path):
    """Train on the GPU in bf16 over NCCL, export, and reproduce the validation metric on CPU."""
    from jobs.config import load_recipe
    from jobs.evaluate import evaluate
    from jobs.train import train
    from tests.conftest import CONFIGS

    recipe = load_recipe(
        CONFIGS / "retinopathy.yaml",
        "tiny",
        [f"data.root={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}", "scaling.num_workers=1",
         "scaling.use_gpu=true", "train.dtype=bf16"],
    )  # fmt: skip
    s = train(recipe)
    assert s["dtype"] == "bf16" and s["metrics"]["kappa"] >= 0.6
    result = evaluate(s["paths"]["model"], str(tmp_path / "data"), split="val", out_dir=tmp_path / "eval")
    assert result["kappa"] == pytest.approx(s["metrics"]["kappa"], abs=0.02)
