"""deepfleet bench, sections train and ingest, on a very small retinopathy dataset: the fields, the
FLOP count of a module whose count is known by hand, and rates and ratios within loose bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMALL = ("data.num_images=160", "data.image_size=64")  # ~10 s to generate, 4-5 steps an epoch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny retinopathy recipe on 160 small images, where the bench keeps its data."""
    from jobs import tasks
    from jobs.bench import train_step

    work = tmp_path_factory.mktemp("bench")
    recipe = train_step.recipe("retinopathy", True, work / "train", *SMALL)
    assert Path(recipe.data.root) == work / "data" / "retinopathy"
    tasks.get("retinopathy").prepare(recipe)
    return recipe


@pytest.mark.timeout(60)
def test_flops_of_a_linear_layer_match_the_hand_count():
    from jobs.bench.train_step import count_flops

    n, k, m = 8, 32, 16
    layer = torch.nn.Linear(k, m)
    x = torch.randn(n, k, requires_grad=True)  # so backward computes the input's gradient too
    got = count_flops(layer, (x,), lambda out: out.sum(), batch_size=n)
    # forward 2km per sample; backward twice that (input and weight gradients)
    assert got["flops_per_sample"] == 3 * 2 * k * m
    assert got["embedding_rows_per_sample"] == 0

    table = torch.nn.Embedding(100, 4)
    ids = torch.randint(0, 100, (n, 5))
    got = count_flops(table, (ids,), lambda out: out.sum(), batch_size=n)
    assert got["flops_per_sample"] == 0  # lookups are no FLOPs: the bench reports their bytes
    assert got["embedding_rows_per_sample"] == 5 and got["embedding_bytes_per_sample"] == 5 * 4 * 4


@pytest.mark.timeout(120)
def test_utilisation_of_a_linear_layer_is_within_the_matmul_peak():
    """A stack of Linear layers trains on the matmuls the peak is measured with: its achieved
    FLOP/s (hand-countable FLOPs x measured samples/s) is a share of that peak."""
    from jobs.bench import median_rate
    from jobs.bench.train_step import count_flops, matmul_peak, utilisation, with_threads

    n, k = 64, 256
    model = torch.nn.Sequential(torch.nn.Linear(k, k), torch.nn.ReLU(), torch.nn.Linear(k, 1))
    x, opt = torch.randn(n, k), torch.optim.AdamW(model.parameters())
    flops = count_flops(model, (x,), lambda out: out.sum(), n)
    # the first layer's input needs no gradient: forward 2k(k+1), backward all but that input's
    assert flops["flops_per_sample"] == 2 * k * (k + 1) + 2 * k * k + 2 * 2 * k

    def steps() -> int:
        for _ in range(20):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        return 20 * n

    rate = with_threads(1, lambda: median_rate(steps, repeats=3))["median"]
    peak = matmul_peak(1, n=1024, repeats=3)["flops"]
    one = {
        "flops": flops,
        "recipe_stage": 0,
        "ours": {"0": {"samples_per_s": rate}},
        "plain": {"samples_per_s": rate},
    }
    use = utilisation(one, peak)
    assert 0 < use["of_peak"] <= 1 and use["dtype"] == "fp32", use


@pytest.mark.timeout(60)
def test_steady_windows_leave_out_warm_up_and_epoch_starts():
    from jobs.bench.train_step import plan_steps, steady_windows

    # 5 steps an epoch, a line every 2: lines at 2 (run start), 4, 6 (holds step 6, an epoch
    # start), 8, 10, 12 (holds step 11, an epoch start) ...
    assert plan_steps(per_epoch=5, window=2, measured=3) == 10
    lines = [{"step": s, "epoch": (s - 1) // 5} for s in (2, 4, 6, 8, 10)]
    assert [ln["step"] for ln in steady_windows(lines)] == [4, 8, 10]
    assert plan_steps(per_epoch=100, window=10, measured=4) == 50
    # 4 steps an epoch: the line at 6 holds steps 5-6 and epoch 1's start
    assert plan_steps(per_epoch=4, window=2, measured=2) == 8


@pytest.mark.timeout(400)
def test_train_section_measures_both_sides(ray_local, small):
    from jobs.bench import train_step

    lines: list[str] = []
    one = train_step.measure(small, "tiny", (small.train.zero_stage,), True, lines.append, windows=2)
    plain, ours = one["plain"], one["ours"][str(small.train.zero_stage)]
    # the plain loop took its turns before each of our epochs and after the last (3 windows each)
    turns = ours["plain_turns"]
    assert len(turns) >= 2 and "0" in turns and all(len(t["repeats"]) == 3 for t in turns.values())
    assert plain["samples_per_s"] > 0 and plain["threads"] == 1 and len(plain["repeats"]) == 3 * len(turns)
    # each steady window against the plain turns around its epoch
    assert len(ours["window_ratios"]) == 2 and ours["ratio"] == pytest.approx(sum(ours["window_ratios"]) / 2)
    assert ours["threads"] == 1  # the same thread count on both sides
    # one rank has nothing to partition: the profile's ZeRO 2 runs as stage 0 (jobs.worker)
    assert ours["workers"] == 1 and ours["zero_stage"] == 2 and ours["engine_zero_stage"] == 0
    assert ours["keep_freed_memory"] is True  # glibc here: the worker keeps freed memory
    assert len(ours["windows"]) == 2 and all(r > 0 for r in ours["windows"])
    assert 0.3 < ours["ratio"] < 3, ours
    assert 0.3 < ours["cpu_ratio"] < 3, ours
    assert ours["step_s"] > 0 and ours["wait_s"] >= 0
    assert one["flops"]["flops_per_sample"] > 1e8  # a ResNet-10 at 64 px: ~0.4 GFLOP a sample
    peak = train_step.matmul_peak(1, n=1024, repeats=3)
    assert peak["flops"] > 1e9
    use = train_step.utilisation(one, peak["flops"])
    # counted as direct convolutions: oneDNN's Winograd 3x3 convolutions may pass the mm peak
    assert 0 < use["of_peak"] < 3, use
    # both sides in the dtype the workers run (auto: bf16 on a CPU with native bf16), and bf16
    # against fp32 side by side: the plain loop in each, alternating windows
    from jobs.worker import native_bf16

    assert one["dtype"] == ("bf16" if native_bf16() else "fp32")
    prec = one["precision"]
    if native_bf16():
        assert len(prec["pairs"]) == 3 and 0.3 < prec["ratio"] < 5 and prec["auto"] == "bf16", prec
        assert any("bf16/fp32" in ln for ln in lines)
    else:
        assert prec is None
    assert use["embedding_bytes_per_s"] is None
    result = {
        "runs": [one | {"utilisation": use}],
        "peak": {"fp32": peak, "bf16": peak, "bf16_beats_fp32": False},
    }
    shown = train_step.rows(result)
    assert any("ZeRO 2 (runs 0 on 1 worker)" in measure for _, measure, _ in shown)
    assert not native_bf16() or any("bf16/fp32" in measure for _, measure, _ in shown)
    (t,) = train_step.targets(result)
    assert t["target"] == 0.9 and t["value"] == ours["ratio"]
    assert any("plain" in ln for ln in lines)


@pytest.mark.timeout(400)
def test_ingest_section_measures_every_reader(ray_local, small):
    from jobs.bench import ingest

    r = ingest.measure_task(small, quick=True, progress=lambda _: None)
    workers = r["workers"]
    expected = {
        f"{m}{d}"
        for m in ("pyarrow", "dataloader_0", f"dataloader_{workers}", "ray")
        for d in ("", "+decode")
    }
    assert set(r["methods"]) == expected  # (recsys also times its pipeline without the shuffle)
    for key, m in r["methods"].items():
        assert m["rows_per_s"] > 0 and m["mb_per_s"] > 0 and m["first_batch_s"] >= 0, key
        assert m["steady_rows_per_s"] >= m["rows_per_s"], key  # the start-up left out
    # decoding costs: the raw pyarrow read is the ceiling of every decoded reader
    assert r["methods"]["pyarrow"]["rows_per_s"] > r["methods"]["pyarrow+decode"]["rows_per_s"]
    assert r["ray_vs_dataloader"] > 0 and r["ray_vs_training"] > 0 and r["ray_vs_dataloader_steady"] > 0
    assert r["training_samples_per_s"] > 0
    names = [t["name"] for t in ingest.targets({"tasks": {"retinopathy": r}})]
    assert len(names) == 2 and len(ingest.rows({"tasks": {"retinopathy": r}})) == 11
