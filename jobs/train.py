"""Train driver: recipe -> data -> Ray Train (TorchTrainer + DeepSpeed workers) -> export -> summary.json.

python -m jobs.train configs/retinopathy.yaml --profile tiny [--set key=value ...] [--address ...]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from jobs import tasks
from jobs.config import RecipeBase, save_recipe
from jobs.errors import UserError
from jobs.storage import Lock


def plan_steps(recipe: RecipeBase, manifest: dict) -> tuple[int, int]:
    """Optimizer steps per epoch and in total. Ray's equal split gives every worker
    floor(rows / workers) rows; drop_last and whole accumulation windows give every
    rank the same number of micro-batches."""
    t, world = recipe.train, recipe.scaling.num_workers
    rows = manifest["splits"]["train"]["rows"]
    per_epoch = rows // world // t.batch_size // t.grad_accum
    if per_epoch == 0:
        raise UserError(
            f"the train split has {rows} rows: too few for {world} workers x batch_size {t.batch_size}"
            f" x grad_accum {t.grad_accum}"
        )
    total = per_epoch * t.epochs
    return per_epoch, min(total, t.max_steps) if t.max_steps else total


def check_recipe(recipe: RecipeBase, embedded: bool) -> None:
    """Refuse what the workers cannot run, before anything starts. CPU workers of the embedded
    cluster are this machine's: an explicit bf16 is checked here (elsewhere each worker checks
    its own device and fails in one line)."""
    from jobs.worker import resolve_dtype

    if embedded and not recipe.scaling.use_gpu:
        resolve_dtype(recipe.train.dtype, use_gpu=False, task=recipe.task)


def check_cluster(recipe: RecipeBase, embedded: bool) -> None:
    """Refuse what the cluster cannot hold, before any worker starts (Train would wait forever)."""
    import ray

    s = recipe.scaling
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    if not embedded:  # an autoscaling cluster may still grow to fit
        return
    if s.use_gpu and gpus < s.num_workers:
        raise UserError(
            f"scaling.use_gpu asks for {s.num_workers} GPU workers but this cluster has {gpus} GPUs"
        )
    if s.num_workers * s.cpus_per_worker > cpus:
        raise UserError(
            f"{s.num_workers} workers x {s.cpus_per_worker} CPUs do not fit this cluster's {cpus:g} CPUs "
            "(lower scaling.num_workers or scaling.cpus_per_worker)"
        )


def check_memory(recipe: RecipeBase, embedded: bool) -> None:
    """Refuse, in one line with the numbers, a recipe whose training step cannot fit a worker's
    memory or whose offloaded states cannot fit a node's (jobs.plan: model states as ZeRO lays
    them out, activations measured on the model without computing). CPU workers share their
    node's memory: each gets its share as its "device"."""
    import ray

    from jobs.plan import check_fits

    s = recipe.scaling
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if embedded:
        import psutil

        host = float(psutil.virtual_memory().total)
    else:  # Ray's schedulable memory of the smallest node (autoscaling clusters may add more)
        host = min((n["memory"] for n in nodes if "memory" in n), default=None)
    if s.use_gpu:
        per_node = max((int(n.get("GPU", 0)) for n in nodes), default=0) or s.num_workers
        check_fits(recipe, gpu_memory(), host, min(per_node, s.num_workers))
    elif host is not None:
        per_node = min(s.num_workers, max(1, int(max(n.get("CPU", 1) for n in nodes) // s.cpus_per_worker)))
        check_fits(recipe, host / per_node, host, per_node, device="CPU worker")


def gpu_memory() -> float | None:
    """Memory of one of the cluster's GPUs: the driver's own, else asked of a one-GPU task (None
    when no GPU answers within a minute: an autoscaling cluster may not have started one yet)."""
    import ray
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)

    @ray.remote(num_gpus=1, num_cpus=0)
    def total() -> float:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)

    try:
        return ray.get(total.remote(), timeout=60)
    except ray.exceptions.GetTimeoutError:
        print("note: no GPU answered within a minute; the memory plan was not checked", flush=True)
        return None


def prepare_data(recipe: RecipeBase) -> dict:
    from data_loaders.shards import verify

    task = tasks.get(recipe.task)
    manifest = task.prepare(recipe)
    verify(recipe.data.root, manifest, splits=["train", "val"])
    return manifest


def _read_lines(path: Path) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by kind (train, val, restore, setup, done), in order."""
    by_kind: dict[str, list[dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            by_kind.setdefault(item.get("kind"), []).append(item)
    return by_kind


def _failure_line(err: Exception) -> str:
    """One line for a failed run: the first worker's error, not Ray's wrapping of it."""
    failures = getattr(err, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(err, "controller_failure", None) or err
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip().splitlines()
    last = next((ln for ln in reversed(text) if ln.strip() and not ln.startswith(" ")), type(cause).__name__)
    return f"training failed: {last}"


def train(
    recipe: RecipeBase,
    address: str | None = None,
    callbacks: list | None = None,
    echo: bool = True,
    export: bool = True,
    epoch_hook=None,
    check_fit: bool = True,
    verbose: bool | None = None,
) -> dict | None:
    """Run (or resume) the recipe's training; returns the summary that is also written to summary.json.

    callbacks: extra Ray Train callbacks (a Tune trial passes Tune's report callback);
    echo: print progress (a Tune trial leaves that to the sweep's own lines);
    export: export the model and write summary.json (`finish`); a Tune trial leaves that to the
    sweep, which exports its best trial only (the scheduler may stop a trial at any report);
    epoch_hook: a function of the step, called on rank 0 before each epoch and after the last with
    no input pipeline running, while every rank waits for it (deepfleet bench times its plain
    PyTorch loop there: jobs.bench.train_step.Turns.hand_over);
    check_fit: check the memory plan first (check_memory); a Tune sweep checks it once before
    its trials, whose drivers hold no GPU to ask and would wait for one their peers hold;
    verbose: Ray's lines, the workers' output and library warnings on the console as well (default:
    --verbose, jobs.tracking.verbose); otherwise they go to the run's logs/ folder."""
    # jobs.export (finish) is imported before the run, not after it: a Ray job's driver runs in
    # the job's unpacked working directory, which Ray may delete and unpack afresh while the run
    # goes on (seen when a node is lost), and torch reads the working directory when it first
    # imports torch._dynamo (through torchvision): FileNotFoundError after a finished run.
    import jobs.export  # noqa: F401
    from cluster.local import connect
    from jobs import tracking

    # paths travel to workers on other nodes: make them absolute (shared storage on clusters)
    recipe.data.root = str(Path(recipe.data.root).expanduser().resolve())
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # one process trains a run at a time; a killed one leaves no lock (jobs.storage). The wait
    # covers a killed sweep's trial actors, which Ray stops a few seconds after their driver.
    with Lock(None, str(run_dir / RUN_LOCK), f"run {run_dir}", wait_s=RUN_LOCK_WAIT_S):
        same_run(recipe)
        embedded = not (address or os.environ.get("RAY_ADDRESS"))
        check_recipe(recipe, embedded)
        manifest = prepare_data(recipe)  # no Ray needed: data mistakes surface in seconds
        same_data(recipe, manifest)
        save_recipe(recipe, run_dir / "config.yaml")
        (run_dir / RUN_DATA).write_text(json.dumps({"fingerprint": manifest["fingerprint"]}))
        steps = plan_steps(recipe, manifest)
        verbose = tracking.verbose() if verbose is None else verbose
        connect(address)
        check_cluster(recipe, embedded)
        if check_fit:
            check_memory(recipe, embedded)
        with tracking.run_log(run_dir / "logs" / "driver.log") if not verbose else contextlib.nullcontext():
            result, wall = _fit(recipe, manifest, steps, callbacks, echo, epoch_hook, verbose)
        if result.checkpoint is None:
            raise UserError(f"training of {run_dir} ended without a checkpoint")
        return finish(recipe, result.checkpoint, manifest, wall) if export else None


RUN_LOCK = ".lock"
RUN_LOCK_WAIT_S = 10.0
RUN_DATA = "data.json"  # the fingerprint of the data the run trains on


def _refuse_changes(recipe: RecipeBase, changed: list[str]) -> None:
    if changed and not recipe.run.allow_changes:
        raise UserError(
            f"run {recipe.run_dir} was trained with another {', '.join(changed)}: start a new run "
            "(--name) or --set run.allow_changes=true to go on with this one"
        )


def same_run(recipe: RecipeBase) -> RecipeBase | None:
    """The recipe an existing run was started with (None for a new run). A run resumes with a
    longer budget or other settings, but not with another task or model: its checkpoints hold
    that model. Refused naming the keys, before anything in the run changes."""
    previous = recipe.run_dir / "config.yaml"
    if not previous.exists():
        return None
    import yaml

    from jobs.config import recipe_from_dict

    try:
        old = recipe_from_dict(yaml.safe_load(previous.read_text()))
    except Exception:
        _refuse_changes(recipe, ["recipe (its config.yaml no longer loads)"])
        return None
    if old.task != recipe.task:
        _refuse_changes(recipe, [f"task ({old.task}, not {recipe.task})"])
        return old
    was, now = old.model.model_dump(mode="json"), recipe.model.model_dump(mode="json")
    _refuse_changes(recipe, [f"model.{k}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)])
    if old.config_hash() != recipe.config_hash():
        print(
            f"note: resuming {recipe.run_dir} with a changed recipe (config hash {old.config_hash()} -> "
            f"{recipe.config_hash()})",
            flush=True,
        )
    return old


def same_data(recipe: RecipeBase, manifest: dict) -> None:
    """An existing run goes on with the data it trained on (its fingerprint), or refuses."""
    recorded = recipe.run_dir / RUN_DATA
    fingerprint = json.loads(recorded.read_text())["fingerprint"] if recorded.is_file() else None
    if fingerprint and fingerprint != manifest["fingerprint"]:
        _refuse_changes(
            recipe, [f"data (fingerprint {fingerprint[:12]}, now {manifest['fingerprint'][:12]})"]
        )


def _fit(recipe: RecipeBase, manifest: dict, steps: tuple[int, int], callbacks, echo, epoch_hook, verbose):
    """Ray Train's fit of the recipe on the connected cluster: its result and wall time."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.local import worker_env
    from jobs.tracking import Progress
    from jobs.worker import ValidationShards, train_loop_per_worker

    task, run_dir, s = tasks.get(recipe.task), recipe.run_dir, recipe.scaling
    steps_per_epoch, total_steps = steps

    # on the driver's node: losing a worker node must not lose the progress log (restores included)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json"),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "run_dir": str(run_dir),
            "progress": progress,
            "epoch_hook": epoch_hook,
            "verbose": verbose,
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=recipe.run_name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=recipe.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.run.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(use_gpu=s.use_gpu)},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        datasets=task.datasets(recipe, manifest),
        dataset_config=ValidationShards(),  # jobs.worker: what validate() reads
    )
    tic = time.perf_counter()
    title = f"{recipe.task} {recipe.run_name}"
    with Progress(progress, run_dir / "metrics.jsonl", total_steps, title, echo=echo):
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise UserError(_failure_line(e)) from None
    return result, time.perf_counter() - tic


def train_siblings(recipe: RecipeBase, manifest: dict) -> dict[str, dict]:
    """The task's sibling runs (`siblings`: recsys trains its MF baseline on the same data and
    engine), each trained, resumed, or reused when a finished run of the same recipe on the same
    data exists; their summaries by name, for the task's baseline()."""
    import ray

    out = {}
    for name, sibling in tasks.get(recipe.task).siblings(recipe).items():
        done = sibling.run_dir / "summary.json"
        summary = json.loads(done.read_text()) if done.is_file() else None
        if summary and (summary.get("config_hash"), summary.get("data_fingerprint")) != (
            sibling.config_hash(),
            manifest["fingerprint"],
        ):
            summary = None
        if summary is None:
            print(f"sibling run {sibling.run_name}: {name}", file=sys.stderr, flush=True)
            # the driver is connected already; naming its cluster skips the embedded-cluster checks
            summary = train(sibling, address=ray.get_runtime_context().gcs_address)
        out[name] = summary
    return out


def finish(recipe: RecipeBase, checkpoint, manifest: dict, wall: float | None = None) -> dict:
    """Export a finished run's checkpoint (a ray.train.Checkpoint) and write its summary.json."""
    from jobs.export import export
    from jobs.worker import CKPT_TAG, zero_stage

    task, run_dir, s = tasks.get(recipe.task), recipe.run_dir, recipe.scaling
    metrics_path = run_dir / "metrics.jsonl"
    lines = _read_lines(metrics_path)
    val = (lines.get("val") or [{}])[-1]
    done = (lines.get("done") or [{}])[-1]
    # what the workers ran, as they reported it (a CPU driver cannot tell what a GPU worker resolved)
    setup = (lines.get("setup") or [{}])[-1]
    metrics = {k: val[k] for k in (*task.METRICS, "val_loss", "val_rows") if k in val}
    baseline = task.baseline(recipe, manifest, train_siblings(recipe, manifest))
    with checkpoint.as_directory() as ckpt:
        state = json.loads(Path(ckpt, "state.json").read_text())
        model_dir = export(
            Path(ckpt),
            recipe,
            run_dir / "model",
            tag=CKPT_TAG,
            metrics=metrics,
            baseline=baseline,
            data_fingerprint=manifest["fingerprint"],
            lineage={"run": str(run_dir), "checkpoint": checkpoint.path, "step": state["step"]},
            training={k: setup[k] for k in ("dtype", "zero_stage", "world", "device") if k in setup},
        )
    restores = lines.get("restore", [])
    speeds = [ln["samples_per_s"] for ln in lines.get("train", [])[-20:]]
    summary = {
        "task": recipe.task,
        "run": recipe.run_name,
        "profile": recipe.profile,
        "metrics": metrics,
        "baseline": baseline,
        "samples_per_s": sum(speeds) / len(speeds) if speeds else None,
        "steps": state["step"],
        "epochs": state["epoch"],
        "samples": state["samples"],
        "world_size": s.num_workers,
        "zero_stage": setup.get("zero_stage", zero_stage(recipe, s.num_workers)),
        "dtype": setup.get("dtype"),
        "config_hash": recipe.config_hash(),
        "data_fingerprint": manifest["fingerprint"],
        "restores": [r["step"] for r in restores],
        "wall_s": round(wall, 1) if wall is not None else None,
        "paths": {
            "run_dir": str(run_dir),
            "checkpoint": checkpoint.path,
            "model": str(model_dir),
            "wandb": done.get("wandb"),
            "metrics": str(metrics_path),
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    from jobs.cli import main as cli

    cli(["train", *(argv or [])])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
