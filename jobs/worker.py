"""The per-worker training loop: one file, read top to bottom.

    setup -> build (model, AdamW, warm-up + cosine, DeepSpeed engine) -> restore -> fit
    fit:  per epoch, equal micro-batches on every rank -> engine.backward/step
          -> validation, each rank on its share of the split (metrics summed by torchmetrics)
          -> DeepSpeed checkpoint from every rank -> ray.train.report

Every rank runs the same number of forward passes and collectives, in the same order: a
rank that ran one more would wait forever for its peers.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, DataConfig

from jobs import tasks
from jobs.config import RecipeBase, recipe_from_dict
from jobs.errors import UserError
from jobs.tracking import RunLogger, StepClock, output_to_file

CKPT_TAG = "ds"  # one fixed tag: Ray already versions checkpoint directories


def zero_stage(recipe: RecipeBase, world_size: int) -> int:
    """The ZeRO stage the engine runs: the recipe's, except 0 on a single rank without offload.

    ZeRO partitions optimizer state, gradients and (stage 3) parameters across data-parallel
    ranks. One rank has nothing to partition: stages 1-3 would only route every step's gradients
    and weights through flat fp32 copies, a cost with no saving. Offload keeps its stage on one
    rank: moving optimizer state to CPU memory is ZeRO-Offload's point on a single GPU."""
    t = recipe.train
    return 0 if world_size == 1 and t.offload == "none" else t.zero_stage


# ZeRO-3 gathers a module's parameters before it runs and frees them after, through hooks on
# every submodule down to each convolution and norm. The bookkeeping of those hooks runs in Python
# at every call, forward and backward, of every micro-batch: profiled on the eight-ResNet-50
# autonomous model, it was most of a step. These blocks are gathered whole instead, as FSDP wraps
# transformer blocks: one gather and one release per block, and each block's parameters are small
# beside the activations it makes.
ZERO3_BLOCKS = (
    "torchvision.models.resnet.BasicBlock",
    "torchvision.models.resnet.Bottleneck",
    "torch.nn.modules.transformer.TransformerEncoderLayer",
    "torch.nn.modules.transformer.TransformerDecoderLayer",
    "transformers.models.convnext.modeling_convnext.ConvNextLayer",
)


def deepspeed_config(recipe: RecipeBase, world_size: int, dtype: str) -> dict:
    t = recipe.train
    stage = zero_stage(recipe, world_size)
    zero: dict = {"stage": stage}
    config: dict = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # bf16 through torch autocast, not DeepSpeed's bf16 engine: parameters, gradients and AdamW
        # states stay fp32 (the master weights are the module's own), matmuls and convolutions run
        # in bf16, and what autocast keeps in fp32 stays so (BatchNorm and its running statistics,
        # norms, softmax, losses). DeepSpeed's bf16 engine casts the module's parameters but not
        # its buffers: BatchNorm then fails at the first step on CPU (bf16 weights, fp32 statistics).
        # Gradients of the autocast layers are reduced in bf16 (DeepSpeed's comm_dtype).
        "torch_autocast": {"enabled": dtype == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        zero["leaf_module"] = {"classes": list(ZERO3_BLOCKS)}
    if t.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": recipe.scaling.use_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": recipe.scaling.use_gpu}
        # ZeRO-Offload steps the optimizer on the host: DeepSpeed refuses a client torch optimizer
        # there and builds DeepSpeedCPUAdam (AdamW's maths in vectorised C++, JIT-built with the
        # host's compiler on first use) from this section
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    else:
        # AdamW from torch: no fused op to compile, the same maths on every stage
        config["zero_allow_untested_optimizer"] = True
    return config


def keep_freed_memory() -> bool:
    """Keep memory the process frees for its next use (glibc mallopt: no mmap for large blocks,
    no trimming of the heap). A training step frees and allocates the same activations every
    time; glibc's defaults hand blocks over 128 KB-32 MB back to the kernel and fault them in
    again, zeroed, on the next step: page faults and system time in every step. False where the
    C library has no mallopt (not glibc): nothing changes there."""
    import ctypes

    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; a trim threshold of -1 disables trimming
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):
        return False


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): elsewhere torch emulates it,
    slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(requested: str, use_gpu: bool, task: str) -> str:
    """The compute dtype a worker runs: `auto` is bf16 on GPUs that support it, and on CPUs with
    native bf16 for the tasks whose step it makes faster there (the task's CPU_BF16; measured by
    `deepfleet bench --section train`), fp32 elsewhere. An explicit bf16 the device cannot run
    is a UserError (one line)."""
    gpu = use_gpu and torch.cuda.is_available()
    supported = torch.cuda.is_bf16_supported() if gpu else native_bf16()
    if requested == "auto":
        return "bf16" if supported and (gpu or tasks.get(task).CPU_BF16) else "fp32"
    if requested == "bf16" and not supported:
        where = (
            "this GPU"
            if gpu
            else "this CPU (no AVX512-BF16 or AMX: torch would emulate bf16, slower than fp32)"
        )
        raise UserError(f"train.dtype bf16: {where} has no native bf16; use train.dtype fp32 or auto")
    return requested


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks. DeepSpeed, unlike DDP, never syncs
    buffers: each rank would validate (and rank 0 would export) its own statistics."""
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


class ValidationShards(DataConfig):
    """Ray Train's dataset split: "train" into equal shards (every rank takes as many steps), "val"
    into disjoint shards that drop no row (exact metrics, and each rank reads only its share: the
    full autonomous validation split is tens of GB)."""

    def __init__(self):
        super().__init__(datasets_to_split=["train", "val"])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        val = datasets.get("val")
        rest = {k: v for k, v in datasets.items() if k != "val"}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if val is not None:
            if val.name is None:
                val.set_name("val")
            shards = val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, shard in enumerate(shards):
                out[rank]["val"] = shard
        return out


def lockstep(batches, device: torch.device):
    """This rank's batches, then None while any peer still has some: every rank runs as many
    forward passes as the rank with the most (ZeRO-3 gathers parameters collectively in each)."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch


@torch.no_grad()
def validate(engine, task, recipe, shard, device, dtype, spare: dict) -> dict:
    """Metrics of this rank's share of the validation split (Ray splits its rows across ranks,
    none dropped: ValidationShards), summed over ranks by torchmetrics. At ZeRO 3 a rank
    whose rows ran out keeps stepping forward on `spare` (a training batch) with its peers."""
    engine.eval()
    metric = task.metrics(recipe).to(device)
    size = recipe.train.eval_batch_size or recipe.train.batch_size
    batches = shard.iter_batches(batch_size=size, batch_format="numpy")
    if engine.zero_optimization_stage() == 3:
        batches = lockstep(batches, device)
    for batch in batches:
        if batch is None:
            engine(*task.inputs(spare, device, dtype))
            continue
        metric.update(engine(*task.inputs(batch, device, dtype)), task.targets(batch, device))
    engine.train()
    return metric.compute()


def train_batches(shard, task, recipe: RecipeBase, epoch: int):
    """An epoch's numpy micro-batches of this rank's training shard (whole batches only).

    A task that shuffles rows (SHUFFLE_BUFFER_ROWS) gets them in windows of that many rows, each
    permuted by a generator seeded with the recipe's seed and the epoch: a resumed epoch sees the
    order it saw before, the next epoch another one. Ray Data's own local shuffle buffer does the
    same mixing, several times slower, on the training worker's thread."""
    rows = task.SHUFFLE_BUFFER_ROWS
    size = recipe.train.batch_size
    if not rows:
        return shard.iter_batches(batch_size=size, batch_format="numpy", drop_last=True, prefetch_batches=2)
    windows = shard.iter_batches(batch_size=rows, batch_format="numpy", prefetch_batches=1)
    return shuffled(windows, size, np.random.default_rng([recipe.train.seed, epoch]))


def shuffled(windows, size: int, rng: np.random.Generator):
    """Batches of `size` rows drawn without replacement from each window in a random order; the
    rows a window leaves over join the next one, the last ones of the epoch are dropped."""
    left: dict | None = None
    for window in windows:
        if left:
            window = {k: np.concatenate([left[k], v]) for k, v in window.items()}
        order = rng.permutation(len(next(iter(window.values()))))
        whole = len(order) - len(order) % size
        for i in range(0, whole, size):
            yield {k: v[order[i : i + size]] for k, v in window.items()}
        left = {k: v[order[whole:]] for k, v in window.items()}


def save_and_report(engine, state: dict, metrics: dict, rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # every rank writes its own ZeRO shard; Ray gathers the rank directories into one checkpoint
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        if rank == 0:
            Path(tmp, "state.json").write_text(json.dumps(state))
        ray.train.report({**metrics, **state}, checkpoint=Checkpoint.from_directory(tmp))


def restore(engine) -> dict:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "step": 0, "samples": 0, "restored_from_step": None}
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag=CKPT_TAG)
        state = json.loads(Path(d, "state.json").read_text())
    state["restored_from_step"] = state["step"]
    return state


def build(recipe: RecipeBase, world: int, dtype_name: str, total_steps: int):
    """The task's model, AdamW, warm-up + cosine schedule and the DeepSpeed engine around them
    (call with the same torch seed on every rank). With offload, DeepSpeed builds the AdamW
    from its config (deepspeed_config); the schedule is handed over as a function of it."""
    import deepspeed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    t = recipe.train
    model = tasks.build_model(recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(recipe, world, dtype_name)
    optimizer = (
        None if "optimizer" in config else torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    )

    def schedule_of(opt):
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps, min_lr_rate=t.min_lr_ratio
        )

    engine, _, _, schedule = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=schedule_of,
        config=config,
        dist_init_required=False,  # the process group is up already (Ray Train's)
    )
    # one rank at ZeRO 0 has no peer to average gradients with, yet DeepSpeed would flatten them,
    # all-reduce over a group of one and copy them back every step, for nothing; ZeRO 1-3 reduce
    # into their partitions there, so they keep it (ZeRO-Offload on one GPU)
    engine.enable_backward_allreduce = world > 1 or engine.zero_optimization_stage() > 0
    return engine, schedule


@dataclass
class Worker:
    """One rank's part of the run: what every stage of its loop needs."""

    recipe: RecipeBase
    task: Any
    engine: Any
    schedule: Any
    device: torch.device
    rank: int
    world: int
    steps_per_epoch: int
    total_steps: int
    logger: RunLogger
    progress: Any  # the driver's queue (Progress), or None
    epoch_hook: Callable[[int], None] | None
    # inputs stay fp32: the engine's autocast casts them where a layer computes in bf16
    dtype: torch.dtype = torch.float32

    def send(self, item: dict) -> None:
        """A progress line to the driver (rank 0 speaks for every rank)."""
        if self.rank == 0:
            _send(self.progress, item)

    def at_epoch_boundary(self, step: int) -> None:
        """Before each epoch and after the last, with no input pipeline running: rank 0 calls the
        run's epoch hook (deepfleet bench times its plain PyTorch loop there) while every rank
        waits for it."""
        if self.epoch_hook is None:
            return
        if self.rank == 0:
            self.epoch_hook(step)
        dist.barrier()


def setup(config: dict) -> tuple[Worker, dict]:
    """Steps 1-3: this rank's threads and output, the engine (built with the same seed on every
    rank), the restored state (after a worker failure, or when the same run name starts again);
    rank 0 reports what the workers run (the setup line)."""
    recipe = recipe_from_dict(config["recipe"])
    t, s = recipe.train, recipe.scaling
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.get("verbose"):  # the console shows the driver's progress, not each worker's output
        output_to_file(Path(config["run_dir"]) / "logs" / f"worker-{rank}.log")
    dtype_name = resolve_dtype(t.dtype, s.use_gpu, recipe.task)
    threads_given, kept = torch.get_num_threads(), keep_freed_memory()
    if not s.use_gpu:
        # a worker computes on the CPUs it reserved, whatever process Ray reuses for it
        torch.set_num_threads(max(1, int(s.cpus_per_worker)))
    torch.manual_seed(t.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    engine, schedule = build(recipe, world, dtype_name, config["total_steps"])
    state = restore(engine)
    w = Worker(
        recipe=recipe,
        task=tasks.get(recipe.task),
        engine=engine,
        schedule=schedule,
        device=ray.train.torch.get_device(),
        rank=rank,
        world=world,
        steps_per_epoch=config["steps_per_epoch"],
        total_steps=config["total_steps"],
        logger=RunLogger(rank, recipe, Path(config["run_dir"])),
        progress=config.get("progress"),
        epoch_hook=config.get("epoch_hook"),
    )
    w.send(
        {
            "kind": "setup",
            "world": world,
            "device": str(w.device),
            "dtype": dtype_name,
            "zero_stage": zero_stage(recipe, world),
            "recipe_zero_stage": t.zero_stage,
            "offload": t.offload,
            "threads": torch.get_num_threads(),
            "threads_given": threads_given,
            "keep_freed_memory": kept,
        }
    )
    if state["restored_from_step"] is not None:
        w.send({"kind": "restore", "step": state["step"], "epoch": state["epoch"]})
    return w, state


def train_loop_per_worker(config: dict) -> None:
    # 1-3. setup, build, restore
    w, state = setup(config)
    t = w.recipe.train
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    metrics: dict = {}
    while state["epoch"] < t.epochs and state["step"] < w.total_steps:
        w.at_epoch_boundary(state["step"])
        # 4. fit one epoch
        spare = train_epoch(w, state, train_shard)
        # 5. validate, checkpoint, report
        sync_buffers(w.engine.module, w.world)
        metrics = validate(w.engine, w.task, w.recipe, val_shard, w.device, w.dtype, spare)
        w.logger.log(metrics, state["step"])
        w.send({"kind": "val", "step": state["step"], "epoch": state["epoch"], **metrics})
        save_and_report(w.engine, state, metrics, w.rank)
    w.at_epoch_boundary(state["step"])
    w.logger.summary(metrics)
    w.logger.finish()
    w.send({"kind": "done", "step": state["step"], "wandb": w.logger.path})


class Window:
    """The optimizer steps since the last progress line: their summed loss (kept on the device:
    reading it every step would wait for the GPU) and where their time went."""

    def __init__(self, device: torch.device):
        self.tic, self.steps = time.perf_counter(), 0
        self.loss = torch.zeros((), device=device)
        self.clock = StepClock()  # waiting for batches vs computing


def train_epoch(w: Worker, state: dict, shard) -> dict | None:
    """One epoch of micro-batches (the same number on every rank) through forward, backward and
    DeepSpeed's step, until the epoch's steps or max_steps are done; a progress line every
    log_every steps and checkpoints every checkpoint_every. Returns the last micro-batch:
    validation's stand-in on a rank whose validation rows ran out (ZeRO 3)."""
    t = w.recipe.train
    micro_per_epoch = w.steps_per_epoch * t.grad_accum
    window, consumed, spare = Window(w.device), 0, None
    for batch in train_batches(shard, w.task, w.recipe, state["epoch"]):
        window.clock.ready()
        spare = batch
        if consumed == micro_per_epoch or state["step"] >= w.total_steps:
            break  # leftover micro-batches would leak an accumulation into the next epoch
        output = w.engine(*w.task.inputs(batch, w.device, w.dtype))
        loss = w.task.loss(w.recipe, output, batch, w.device)
        w.engine.backward(loss)
        w.engine.step()
        consumed += 1
        window.loss += loss.detach().float() / t.grad_accum
        window.clock.done()
        if consumed % t.grad_accum:
            continue
        state["step"] += 1
        state["samples"] += t.batch_size * t.grad_accum * w.world
        window.steps += 1
        if state["step"] % t.log_every == 0 or state["step"] == w.total_steps:
            log_window(w, state, window, batch)
            window = Window(w.device)
        if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and state["step"] < w.total_steps:
            save_and_report(w.engine, state, {}, w.rank)
            window.clock.skip()  # a checkpoint is neither waiting for data nor a step
    # an epoch stopped part-way by max_steps is not finished: a longer resumed run redoes it
    if consumed == micro_per_epoch or state["step"] < w.total_steps:
        state["epoch"] += 1
    return spare


def log_window(w: Worker, state: dict, window: Window, batch: dict) -> None:
    """The progress line of the steps since the last one: every rank joins the loss's all-reduce
    (the loss shown is the global batch's mean); W&B and the driver get it from rank 0."""
    t = w.recipe.train
    mean_loss = window.loss.double() / window.steps  # on the device: NCCL reduces GPU tensors
    dist.all_reduce(mean_loss)
    global_batch = t.batch_size * t.grad_accum * w.world
    line = {
        "kind": "train",
        "step": state["step"],
        "epoch": state["epoch"],
        "loss": float(mean_loss) / w.world,
        "lr": w.schedule.get_last_lr()[0],
        "samples_per_s": window.steps * global_batch / (time.perf_counter() - window.tic),
        **window.clock.per_step(window.steps),
        **device_memory(w.device),
    }
    if t.trace_batches:  # which rows made this step, rank by rank (checks the maths)
        ids = [None] * w.world
        dist.all_gather_object(ids, w.task.sample_ids(batch))
        line["batch_ids"] = ids
    w.logger.log({k: v for k, v in line.items() if k != "batch_ids"}, state["step"])
    w.send(line)


def device_memory(device: torch.device) -> dict:
    """The GPU memory this rank's process has held at most so far (none on CPU workers)."""
    if device.type != "cuda":
        return {}
    return {"device_memory_peak": torch.cuda.max_memory_allocated(device)}


def _send(queue, item: dict) -> None:
    if queue is None:
        return
    # the driver may have gone away: training goes on and checkpoints still land
    with contextlib.suppress(Exception):
        queue.put_nowait({**item, "time": round(time.time(), 3)})
