"""`deepfleet bench --section train`: our training step against a plain PyTorch loop, and FLOPs
utilisation against the machine's measured matmul peak.

Both sides of every pair: the same recipe (tiny profile), model, seed, batch size, Parquet files
and torch thread count (Ray gives a 1-CPU worker one thread; the plain loop sets the same).

    ours   jobs.train.train(recipe): Ray Data feeding train.get_dataset_shard, the DeepSpeed
           engine's forward/backward/step, progress lines. Quick: one worker at the profile's
           stage. Full: ZeRO 0 on one worker and ZeRO 1-3 on two (ZeRO partitions over ranks: one
           rank without offload runs stage 0 whatever the recipe says, jobs.worker.zero_stage);
           samples/s per worker, against the plain loop's.
           Timed by the worker itself: the progress windows of `train.log_every` steps
           (samples/s from the window's wall clock: waiting for batches, forward, loss,
           backward, step, the loss all-reduce and the W&B/progress line). The first window
           of the run and the first of every epoch (Ray Data's pipeline start) are warm-up;
           validation and checkpoints fall outside the windows.
           The window's split (`step_s` compute, `wait_s` waiting for data) is kept too.
    plain  one process, the same decoded batches held in memory (the task's iter_split):
           model.train(); forward, loss, zero_grad, backward, clip_grad_norm_ (the recipe's
           grad_clip), AdamW step (the recipe's lr and weight decay), warm-up + cosine schedule
           step, as the worker builds them.

The two sides take turns (Turns): before each of our epochs and after the last, while no input
pipeline runs, rank 0 lends the machine to the driver, which times the plain loop (a warm-up
window, then the median of several), then hands it back. Each of our steady windows is divided
by the mean of the plain measurements just before and just after its epoch, and the ratio is
the median of those: a drift in the machine's load (other users, other processes; single runs
measured a minute apart scattered +-0.15 here) moves both sides alike, while the plain loop
still runs on a quiet machine and ours pays for the decoding its pipeline does beside it.

Utilisation: training FLOPs per sample (torch.utils.flop_counter on one forward + loss +
backward), times our samples/s, over the peak of torch.mm on large square matrices at the same
thread count (fp32, which training uses on CPU; bf16 reported beside it). Embedding lookups do
no FLOPs: they are reported as bytes/s (rows looked up per sample x row bytes x samples/s).
FLOPs are counted as direct convolutions and matmuls; oneDNN computes many 3x3 convolutions with
fewer operations (Winograd), so a convolutional network can show more than 100% of the torch.mm
peak (measured: 3x3 convolutions at ~180 counted GFLOP/s where torch.mm reaches ~90 on this CPU).
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jobs.bench import median_rate, target

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = (0, 1, 2, 3)
# quick mode: less data (prepared once, then reused), so a task's section takes a minute or two
QUICK_DATA = {
    "retinopathy": ["data.num_images=600"],
    "autonomous": ["data.num_samples=200"],
    "recsys": ["data.num_sessions=600"],
}
# a size where one step takes well over 100 ms on one thread: the tiny retinopathy model and
# images with twice the batch (~0.7 s a step here), the same Parquet files
LARGE = {"task": "retinopathy", "label": "batch 64", "sets": ["train.batch_size=64"]}
RATIO_TINY, RATIO_LARGE = 0.90, 0.95


def recipe(task: str, quick: bool, work_dir: Path, *sets: str):
    """The task's tiny recipe on the bench's shared data (work_dir.parent/data/<task>)."""
    from jobs.config import load_recipe

    base = [f"data.root={Path(work_dir).parent / 'data' / task}", f"run.output_dir={Path(work_dir) / 'runs'}"]
    if task == "recsys":
        base.append("baselines.mf=false")  # no sibling MF run inside a measurement
    return load_recipe(CONFIGS / f"{task}.yaml", "tiny", [*base, *(QUICK_DATA[task] if quick else []), *sets])


def threads_of(recipe) -> int:
    """The torch thread count of a CPU worker of the recipe (jobs.worker sets it the same way)."""
    return max(1, int(recipe.scaling.cpus_per_worker))


def memory_batches(recipe, count: int = 4) -> list[dict]:
    """`count` decoded training batches of the recipe's batch size, held in memory."""
    from jobs import tasks

    task = tasks.get(recipe.task)
    it = task.iter_split(recipe.data.root, "train", recipe.train.batch_size, **task.input_spec(recipe))
    batches = [
        b for b in itertools.islice(it, count + 1) if len(task.sample_ids(b)) == recipe.train.batch_size
    ]
    if not batches:
        raise ValueError(f"the train split at {recipe.data.root} has less than one batch")
    return batches[:count]


class PlainLoop:
    """A single-process PyTorch training loop of the recipe: the worker's model, optimizer,
    schedule and clipping, without Ray or DeepSpeed. `dtype` bf16 runs the forward under torch's
    CPU autocast, as the engine does (jobs.worker.deepspeed_config); the loss stays outside it."""

    def __init__(self, recipe, total_steps: int = 10_000, dtype: str = "fp32", device: str = "cpu"):
        import torch
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        from jobs import tasks

        self.recipe, self.task, self.dtype = recipe, tasks.get(recipe.task), dtype
        self.device = torch.device(device)
        t = recipe.train
        torch.manual_seed(t.seed)
        self.model = tasks.build_model(recipe).train().to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.schedule = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, t.warmup_steps, total_steps, min_lr_rate=t.min_lr_ratio
        )

    def step(self, batch: dict, sync: bool = True) -> float | None:
        """One training step; its loss (a host synchronisation), unless sync is False."""
        import torch

        t = self.recipe.train
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            output = self.model(*self.task.inputs(batch, self.device, torch.float32))
        loss = self.task.loss(self.recipe, output, batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        return loss.item() if sync else None


def engine_dtype(recipe) -> str:
    """The dtype the recipe's CPU workers run on this machine (jobs.worker.resolve_dtype)."""
    from jobs.worker import resolve_dtype

    return resolve_dtype(recipe.train.dtype, recipe.scaling.use_gpu, recipe.task)


def precision(recipe, batches: list[dict], steps: int, repeats: int) -> dict | None:
    """bf16 against fp32 on this CPU: the plain loop in each dtype (two loops, same seed and
    batches), timed in alternating windows so the host's drift moves both alike; the ratio is
    the median of the pairs' bf16/fp32. None where the CPU has no native bf16 (the engine then
    refuses bf16)."""
    from jobs.worker import native_bf16, resolve_dtype

    if not native_bf16():
        return None
    loops = {d: PlainLoop(recipe, dtype=d) for d in ("fp32", "bf16")}
    for loop in loops.values():  # warm-up: first-use costs (oneDNN kernels, allocator)
        plain_window(loop, batches, steps)
    pairs = [
        {d: plain_window(loop, batches, steps)["samples_per_s"] for d, loop in loops.items()}
        for _ in range(repeats)
    ]
    return {
        "fp32_samples_per_s": statistics.median(p["fp32"] for p in pairs),
        "bf16_samples_per_s": statistics.median(p["bf16"] for p in pairs),
        "ratio": statistics.median(p["bf16"] / p["fp32"] for p in pairs),
        "pairs": pairs,
        "auto": resolve_dtype("auto", recipe.scaling.use_gpu, recipe.task),  # what dtype auto runs here
    }


def with_threads(threads: int, fn: Callable):
    """Run fn() with torch computing on `threads` threads, then restore the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def plain_rate(loop: PlainLoop, batches: list[dict], steps: int, repeats: int, warmup: int = 1) -> dict:
    """Samples/s of `steps` plain steps over the in-memory batches: the median of `repeats` timed
    windows after `warmup` untimed ones, with the CPU seconds a step took on this thread (other
    processes barely move those)."""
    for _ in range(warmup):
        plain_window(loop, batches, steps)
    windows = [plain_window(loop, batches, steps) for _ in range(repeats)]
    rates = [w["samples_per_s"] for w in windows]
    return {
        "median": statistics.median(rates),
        "repeats": rates,
        "step_cpu_s": [w["step_cpu_s"] for w in windows],
    }


def plain_window(loop: PlainLoop, batches: list[dict], steps: int) -> dict:
    """One timed window of `steps` plain steps, cycling over the batches: samples/s and the CPU
    seconds a step took on this thread, at the recipe's thread count."""

    def run() -> dict:
        cycle = itertools.cycle(batches)
        tic, cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            loop.step(next(cycle))
        wall, cpu = time.perf_counter() - tic, time.thread_time() - cpu
        return {"samples_per_s": steps * loop.recipe.train.batch_size / wall, "step_cpu_s": cpu / steps}

    return with_threads(threads_of(loop.recipe), run)


TURN_TIMEOUT_S = 600  # a side that waits longer for its turn: the other one is gone


class Turns:
    """Our engine and the plain loop take turns on the machine. Before each epoch and after the
    last, rank 0 calls hand_over(step) and every rank waits (the engine's epoch hook); the driver's
    thread in serve() times the plain loop meanwhile, then hands the machine back. Picklable: it
    travels in the worker's config."""

    def __init__(self):
        from ray.util.queue import Queue

        self._over, self._back = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})

    def hand_over(self, step: int) -> None:
        """Worker side: an epoch starting after `step` waits until the plain loop's turn is over."""
        self._over.put(step)
        self._back.get(timeout=TURN_TIMEOUT_S)

    def serve(self, play: Callable[[], dict], stop: threading.Event) -> dict[int, dict]:
        """Driver side, until `stop`: play() at each hand-over; its results by the step it came at."""
        from ray.util.queue import Empty

        played: dict[int, dict] = {}
        while not stop.is_set():
            try:
                step = self._over.get(timeout=0.2)
            except Empty:
                continue
            played[step] = play()
            self._back.put(True)
        return played

    def close(self) -> None:
        self._over.shutdown()
        self._back.shutdown()


def count_flops(model, inputs: tuple, loss_fn: Callable, batch_size: int) -> dict:
    """Training FLOPs per sample of one forward, loss and backward (torch.utils.flop_counter:
    matmuls and convolutions, forward and backward), and the embedding rows looked up per
    sample (with their bytes) on the way."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows: list[tuple[int, int]] = []  # (rows looked up, bytes per row) per embedding call

    def hook(module, args, _out):
        row_bytes = module.embedding_dim * module.weight.element_size()
        rows.append((args[0].numel(), row_bytes))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    try:
        with FlopCounterMode(display=False) as counter:
            loss_fn(model(*inputs)).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): n / batch_size for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {
        "flops_per_sample": counter.get_total_flops() / batch_size,
        "by_op": by_op,
        "embedding_rows_per_sample": sum(n for n, _ in rows) / batch_size,
        "embedding_bytes_per_sample": sum(n * b for n, b in rows) / batch_size,
    }


def task_flops(recipe, batch: dict) -> dict:
    import torch

    loop = PlainLoop(recipe)
    cpu = torch.device("cpu")
    inputs = loop.task.inputs(batch, cpu, torch.float32)
    return count_flops(
        loop.model, inputs, lambda out: loop.task.loss(recipe, out, batch, cpu), recipe.train.batch_size
    )


DTYPES = ("fp32", "bf16")


def _merge(a: dict, b: dict) -> dict:
    """Two measurements of one matmul peak as one: the median of all their repeats."""
    rates = a["repeats"] + b["repeats"]
    return {**a, "flops": statistics.median(rates), "repeats": rates}


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5, dtype: str = "fp32") -> dict:
    """FLOP/s of torch.mm of two n x n matrices on `threads` threads (median of repeats)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    out = torch.empty(n, n, dtype=dt)
    flops = 2 * n**3
    reps = max(1, int(4e9 // flops))  # a timed call does about 4 GFLOP

    def run() -> int:
        for _ in range(reps):
            torch.mm(a, b, out=out)
        return reps * flops

    rate = with_threads(threads, lambda: median_rate(run, repeats=repeats, warmup=1))
    return {"dtype": dtype, "n": n, "threads": threads, "flops": rate["median"], "repeats": rate["repeats"]}


# ------------------------------------------------------------------ our side


def plan_steps(per_epoch: int, window: int, measured: int, cap: int = 5000) -> int:
    """The fewest steps that give `measured` steady-state progress windows (a line every
    `window` steps; see steady_windows): the run's first window and every window that holds
    an epoch's start do not count."""
    count = 0
    for step in range(window, cap + 1, window):
        start = step - window  # the window holds steps start+1 .. step
        # steady: no epoch starts inside it or with it (the worker restarts its clock there)
        count += start % per_epoch != 0 and start // per_epoch == (step - 1) // per_epoch
        if count >= measured:
            return step
    return cap


def steady_windows(lines: list[dict]) -> list[dict]:
    """Progress lines of full steady-state windows: drop the run's first window and the first
    window of each epoch (it holds the epoch's pipeline start)."""
    out, last_epoch = [], None
    for i, ln in enumerate(lines):
        if i > 0 and ln["epoch"] == last_epoch:
            out.append(ln)
        last_epoch = ln["epoch"]
    return out


def stage_label(o: dict) -> str:
    """'ZeRO 2 (runs 0 on 1 worker)', 'ZeRO 3 on 2 workers': the stage asked and what ran."""
    ran, workers = o.get("engine_zero_stage", o["zero_stage"]), o.get("workers", 1)
    if ran != o["zero_stage"]:
        return f"ZeRO {o['zero_stage']} (runs {ran} on {workers} worker{'s' * (workers > 1)})"
    return f"ZeRO {ran} on {workers} worker{'s' * (workers > 1)}"


def workers_for(stage: int, quick: bool) -> int:
    """Workers a measurement of `stage` runs: one in quick mode (the profile's stage, as one
    rank runs it); in full mode two for ZeRO 1-3, which partition over ranks."""
    return 1 if quick or stage == 0 else 2


def engine_rate(
    recipe,
    stage: int,
    window: int,
    max_steps: int,
    per_epoch: int,
    run_name: str,
    plain: Callable[[], dict],
    workers: int = 1,
) -> dict:
    """Run our engine (`workers` workers, ZeRO `stage`), taking turns with plain() (the plain
    loop's rate: {"median", "repeats", "step_cpu_s"}) before each epoch and after the last; our
    steady-state rate per worker comes from the progress windows the run recorded in
    metrics.jsonl, each against the plain turns on either side of its epoch."""
    from jobs.config import with_values
    from jobs.train import train

    r = with_values(
        recipe,
        {
            "scaling.num_workers": workers,
            "train.zero_stage": stage,
            "train.max_steps": max_steps,
            "train.epochs": max(recipe.train.epochs, max_steps // per_epoch + 1),
            "train.log_every": window,
            "train.checkpoint_every": None,
            "run.name": run_name,
        },
        "bench",
    )
    shutil.rmtree(r.run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    turns, stop, played = Turns(), threading.Event(), {}
    server = threading.Thread(target=lambda: played.update(turns.serve(plain, stop)), daemon=True)
    server.start()
    tic = time.perf_counter()
    try:
        train(r, echo=False, export=False, epoch_hook=turns.hand_over)
    finally:
        stop.set()
        server.join()
        turns.close()
    fit_s = time.perf_counter() - tic
    lines = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(ln for ln in lines if ln["kind"] == "setup")
    windows = steady_windows([ln for ln in lines if ln["kind"] == "train"])
    if not windows:
        raise RuntimeError(f"no steady-state progress window in {r.run_dir / 'metrics.jsonl'}")
    rates = [ln["samples_per_s"] / workers for ln in windows]  # a progress line counts all ranks
    # the plain turns around each window: the one its epoch started after, the next one
    starts = sorted(played)
    around = [
        (played[max(k for k in starts if k < ln["step"])], played[min(k for k in starts if k >= ln["step"])])
        for ln in windows
    ]
    plain_near = [(a["median"] + b["median"]) / 2 for a, b in around]
    size = r.train.batch_size
    return {
        "zero_stage": stage,
        "engine_zero_stage": setup["zero_stage"],  # what DeepSpeed ran (one rank: 0 unless offload)
        "keep_freed_memory": setup.get("keep_freed_memory"),  # the worker's allocator (jobs.worker)
        "workers": workers,
        "samples_per_s": statistics.median(rates),
        "windows": rates,
        "plain_turns": {str(k): played[k] for k in starts},
        "plain_near": plain_near,
        "window_ratios": [a / p for a, p in zip(rates, plain_near, strict=True)],
        "window_steps": window,
        "steps": max_steps,
        # the window's time split per step: compute (forward, loss, backward, step) and data wait
        "step_s": statistics.median(ln["step_s"] for ln in windows),
        "wait_s": statistics.median(ln["wait_s"] for ln in windows),
        "step_cpu_s": statistics.median(ln["step_cpu_s"] for ln in windows),
        "compute_samples_per_s": size / statistics.median(ln["step_s"] for ln in windows),
        "threads": setup["threads"],
        "fit_s": round(fit_s, 1),
    }


def measure(
    recipe,
    label: str,
    stages: tuple[int, ...],
    quick: bool,
    progress: Callable[[str], None],
    windows: int | None = None,
) -> dict:
    """Plain loop and our engine at the recipe's size, for each ZeRO stage (`windows`: steady
    progress windows to time; default 8: the ratio is their median, and the host's speed drifts
    within one run (one quick run's plain turns: 7,400-10,500 samples/s on recsys), so 4 left the
    median a window's luck)."""
    from jobs import tasks
    from jobs.train import plan_steps as engine_plan

    task, size = recipe.task, recipe.train.batch_size
    batches = memory_batches(recipe)
    dtype = engine_dtype(recipe)
    loop = PlainLoop(recipe, dtype=dtype)  # like with like: the dtype our workers run

    plain_window(loop, batches, len(batches))  # warm-up
    step_s = size / plain_window(loop, batches, len(batches))["samples_per_s"]
    manifest = tasks.get(task).prepare(recipe)
    one = recipe.model_copy(deep=True)
    one.scaling.num_workers = 1
    per_epoch, _ = engine_plan(one, manifest)
    # one step's time sets the window: ~1 s (quick) or ~2 s of steps per progress line, and at
    # least two windows an epoch
    window = max(1, min(round((1.0 if quick else 2.0) / step_s), per_epoch // 2))
    repeats = 3 if quick else 5  # plain windows a turn
    progress(f"{task} {label}: plain {size / step_s:.1f} samples/s ({step_s * 1000:.0f} ms a step)")
    ours = {}
    for stage in stages:
        name = f"{task}-{label.replace(' ', '')}-zero{stage}"
        workers = workers_for(stage, quick)
        per, win = per_epoch, window
        if workers > 1:  # each rank gets 1/workers of the rows: fewer steps an epoch
            multi = one.model_copy(deep=True)
            multi.scaling.num_workers = workers
            per, _ = engine_plan(multi, manifest)
            win = max(1, min(window, per // 2))
        steps = plan_steps(per, win, measured=windows or 8)
        o = engine_rate(
            recipe,
            stage,
            win,
            steps,
            per,
            name,
            lambda n=win: plain_rate(loop, batches, n, repeats),
            workers,
        )
        o["plain_samples_per_s"] = statistics.median(o["plain_near"])
        o["ratio"] = statistics.median(o["window_ratios"])
        o["compute_ratio"] = o["compute_samples_per_s"] / o["plain_samples_per_s"]
        turns = list(o["plain_turns"].values())
        o["cpu_ratio"] = statistics.median(x for t in turns for x in t["step_cpu_s"]) / o["step_cpu_s"]
        # the fastest window against the fastest plain one: both near their unloaded speed
        o["best_ratio"] = max(o["windows"]) / max(x for t in turns for x in t["repeats"])
        # the share of a step's wall time its thread was on a CPU: well below 1, other processes
        # (ours or other users') had the cores, and wall-clock ratios carry that load
        o["cpu_share"] = o["step_cpu_s"] / o["step_s"]
        o["plain_cpu_share"] = statistics.median(
            c * r / size for t in turns for c, r in zip(t["step_cpu_s"], t["repeats"], strict=True)
        )
        ours[stage] = o
        progress(
            f"{task} {label}: {stage_label(o)} {o['samples_per_s']:.1f} samples/s a worker, "
            f"{o['ratio']:.2f}x plain "
            f"{o['plain_samples_per_s']:.1f} (a step: compute {o['step_s'] * 1000:.0f} ms, data wait "
            f"{o['wait_s'] * 1000:.1f} ms; CPU time {o['cpu_ratio']:.2f}x; on a CPU {o['cpu_share']:.0%} of "
            f"the step, plain {o['plain_cpu_share']:.0%}; fit {o['fit_s']:.0f} s)"
        )
    turns = [turn for o in ours.values() for turn in o["plain_turns"].values()]
    repeats_all = [x for turn in turns for x in turn["repeats"]]
    cpu_all = [x for turn in turns for x in turn["step_cpu_s"]]
    plain_result = {
        "samples_per_s": statistics.median(repeats_all),
        "repeats": repeats_all,
        "step_s": size / statistics.median(repeats_all),
        "step_cpu_s": statistics.median(cpu_all),
        "threads": threads_of(recipe),
    }
    return {
        "task": task,
        "label": label,
        "batch_size": size,
        "plain": plain_result,
        "ours": {str(s): o for s, o in ours.items()},
        "recipe_stage": recipe.train.zero_stage,
        "dtype": dtype,
        "flops": task_flops(recipe, batches[0]),
        "precision": bf16_vs_fp32(recipe, batches, window, repeats, progress, f"{task} {label}"),
    }


def bf16_vs_fp32(recipe, batches, steps: int, repeats: int, progress, label: str) -> dict | None:
    p = precision(recipe, batches, steps, repeats)
    if p is None:
        progress(f"{label}: bf16 against fp32 not measured (this CPU has no native bf16)")
    else:
        progress(
            f"{label}: bf16/fp32 {p['ratio']:.2f}x (plain loop, {p['bf16_samples_per_s']:.1f} against "
            f"{p['fp32_samples_per_s']:.1f} samples/s; dtype auto runs {p['auto']})"
        )
    return p


def utilisation(one: dict, peak_flops: float) -> dict:
    """Achieved training FLOP/s of a measured size (FLOPs per sample x our samples/s at the
    profile's ZeRO stage) and its share of the matmul peak in the dtype it ran; embedding lookups
    in bytes/s."""
    f, stage = one["flops"], str(one["recipe_stage"])
    ours = one["ours"][stage]["samples_per_s"]
    return {
        "zero_stage": int(stage),
        "dtype": one.get("dtype", "fp32"),
        "achieved_flops": f["flops_per_sample"] * ours,
        "of_peak": f["flops_per_sample"] * ours / peak_flops,
        "plain_of_peak": f["flops_per_sample"] * one["plain"]["samples_per_s"] / peak_flops,
        "embedding_bytes_per_s": f["embedding_bytes_per_sample"] * ours or None,
    }


def run(tasks: list[str], quick: bool, work_dir: Path, progress: Callable[[str], None]) -> dict:
    from cluster.local import connect
    from jobs import tasks as registry

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    connect()
    runs = []
    threads = threads_of(recipe(tasks[0], quick, work_dir)) if tasks else 1
    repeats = 3 if quick else 5
    first = {d: matmul_peak(threads, dtype=d, repeats=repeats) for d in DTYPES}
    for task in tasks:
        r = recipe(task, quick, work_dir)
        progress(f"{task}: preparing data at {r.data.root}")
        registry.get(task).prepare(r)
        stages = (r.train.zero_stage,) if quick else STAGES  # quick: the profile's own stage
        runs.append(measure(r, "tiny", stages, quick, progress))
        if task == LARGE["task"]:
            big = recipe(task, quick, work_dir, *LARGE["sets"])
            runs.append(measure(big, LARGE["label"], (big.train.zero_stage,), quick, progress))
    # the peak measured again after the runs: its median covers the section's whole span
    peak = {d: _merge(first[d], matmul_peak(threads, dtype=d, repeats=repeats)) for d in DTYPES}
    progress(
        f"matmul peak on {threads} thread(s): fp32 {peak['fp32']['flops'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bf16']['flops'] / 1e9:.1f} GFLOP/s"
    )
    for one in runs:
        one["utilisation"] = utilisation(one, peak[one.get("dtype", "fp32")]["flops"])
    return {
        "threads": threads,
        "peak": {**peak, "bf16_beats_fp32": peak["bf16"]["flops"] > peak["fp32"]["flops"]},
        "runs": runs,
        "timed": {
            "ours": "jobs.train.train, 1 worker: median samples/s of the worker's progress windows "
            "(Ray Data wait + forward/loss/backward/DeepSpeed step + loss all-reduce + progress line); "
            "first window and each epoch's first window left out; validation and checkpoints outside",
            "plain": "one process, in-memory decoded batches: forward, loss, zero_grad, backward, "
            "clip_grad_norm_, AdamW step, schedule step; timed (median of windows of as many steps) "
            "after a warm-up window, before each of our epochs and after the last while our workers "
            "wait with no pipeline running; the ratio is the median of our steady windows / the mean "
            "of the plain turns around their epoch",
            "flops": "torch.utils.flop_counter on one forward + loss + backward, per sample",
            "peak": "torch.mm of n x n matrices at the same thread count, before and after the runs",
        },
    }


def _gflops(x: float) -> str:
    return f"{x / 1e9:.1f} GFLOP/s"


def rows(result: dict) -> list[tuple[str, str, str]]:
    out = []
    for one in result["runs"]:
        task, label, p = one["task"], one["label"], one["plain"]
        out.append(
            (
                task,
                f"{label}: plain PyTorch (batch {one['batch_size']}, {one.get('dtype', 'fp32')})",
                f"{p['samples_per_s']:.1f} samples/s",
            )
        )
        for o in one["ours"].values():
            out.append(
                (
                    task,
                    f"{label}: ours {stage_label(o)}",
                    f"{o['samples_per_s']:.1f} samples/s ({o['ratio']:.2f}x; compute {o['compute_ratio']:.2f}x, "
                    f"CPU time {o['cpu_ratio']:.2f}x, best {o['best_ratio']:.2f}x; "
                    f"on CPU {o['cpu_share']:.0%} vs {o['plain_cpu_share']:.0%})",
                )
            )
        prec = one.get("precision")
        if prec:
            out.append(
                (
                    task,
                    f"{label}: bf16/fp32 (plain loop)",
                    f"{prec['ratio']:.2f}x ({prec['bf16_samples_per_s']:.1f} vs {prec['fp32_samples_per_s']:.1f} "
                    f"samples/s; auto runs {prec['auto']})",
                )
            )
        f, u = one["flops"], one.get("utilisation", {})
        out.append((task, f"{label}: training FLOPs/sample", f"{f['flops_per_sample'] / 1e9:.3f} GFLOP"))
        if u:
            out.append(
                (
                    task,
                    f"{label}: achieved (ZeRO {u['zero_stage']})",
                    f"{_gflops(u['achieved_flops'])} "
                    f"({u['of_peak']:.0%} of the {u['dtype']} peak; plain {u['plain_of_peak']:.0%})",
                )
            )
            if u["embedding_bytes_per_s"]:
                out.append(
                    (
                        task,
                        f"{label}: embedding lookups",
                        f"{u['embedding_bytes_per_s'] / 1e6:.2f} MB/s "
                        f"({f['embedding_rows_per_sample']:.0f} rows/sample)",
                    )
                )
    peak = result["peak"]
    out.append(("", f"matmul peak fp32 ({peak['fp32']['threads']} thread)", _gflops(peak["fp32"]["flops"])))
    out.append(
        ("", "matmul peak bf16", f"{_gflops(peak['bf16']['flops'])} (beats fp32: {peak['bf16_beats_fp32']})")
    )
    return out


def targets(result: dict) -> list[dict]:
    out = []
    for one in result["runs"]:
        large = one["label"] != "tiny"
        bound = RATIO_LARGE if large else RATIO_TINY
        for o in one["ours"].values():
            name = f"train ratio to plain PyTorch, {one['label']}, {stage_label(o)}"
            out.append(target(name, one["task"], o["ratio"], bound))
    return out
