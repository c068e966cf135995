"""One place that starts or joins Ray: an embedded local cluster by default, any cluster by address."""

from __future__ import annotations

import os

DEFAULT_ENV = {
    # Offline W&B needs no key or network; Ray's W&B checks read the environment, not mode=.
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    # our driver shows one progress display; Ray Data's per-dataset bars would bury it
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}
# DeepSpeed picks its CPU accelerator on machines without CUDA; CPU workers say so explicitly.
# It follows the workers, not the driver: a CPU head node drives GPU workers on clusters.
CPU_ACCELERATOR = {"DS_ACCELERATOR": "cpu"}
# Ray Serve's fast path: HAProxy in front of ingress replicas that serve HTTP themselves (no
# Python proxy hop), gRPC between deployments, user code on the replica's own loop: a fraction
# of the default path's overhead over a bare server (docs/benchmarks.md). Serve reads
# these when its processes start, so they belong to the cluster's environment: the embedded
# cluster gets them here, the files in cluster/ set them on every node.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Ray Train on the embedded (one-machine) cluster. The controller polls its workers every 2 s by
# default, and a run's end waits for the next poll: polling every 0.5 s ends every run (and every
# Tune trial) sooner at no measurable cost. The preemption watcher, one more actor process per run,
# watches for cloud nodes being drained: a single machine has none. Train's controller reads
# both from its environment, so they belong to the cluster's environment like SERVE_ENV.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
HAS_GPU = bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


def wandb_env() -> dict[str, str]:
    """The user's WANDB_* settings, never the key: it must not land in job specs, logs or files."""
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_API_KEY"}


def worker_env(extra: dict[str, str] | None = None, use_gpu: bool = False) -> dict[str, str]:
    """Environment every Ray worker gets: our defaults, the CPU accelerator for CPU workers, the
    user's WANDB_* settings, then `extra`."""
    return {**DEFAULT_ENV, **({} if use_gpu else CPU_ACCELERATOR), **wandb_env(), **(extra or {})}


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at `address` (or $RAY_ADDRESS); start an embedded one when neither is set.

    The embedded cluster advertises at least 4 logical CPUs on small machines: two 1-CPU
    training workers would otherwise take every slot and starve the Ray Data tasks that
    feed them (and Tune's trial drivers).
    """
    import ray
    from ray.data import DataContext

    if not HAS_GPU:  # the driver imports DeepSpeed too (export)
        os.environ.update({k: os.environ.get(k, v) for k, v in CPU_ACCELERATOR.items()})

    # Train copies the driver's DataContext to its workers, so this reaches them too
    data_context = DataContext.get_current()
    data_context.enable_progress_bars = False
    # Ray's default Parquet reader (datasource V2) starts 32 footer-reading actors, new worker
    # processes, for every execution: every epoch and every validation pass, many times the
    # V1 reader's time on small splits (deepfleet bench --section ingest); local shards'
    # footers are read in milliseconds without any actor.
    data_context.use_datasource_v2 = False
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    # no DeepSpeed accelerator here: job-wide variables reach every worker on every node, and
    # Train's workers get theirs from worker_env(use_gpu=...)
    runtime_env = {"env_vars": {**DEFAULT_ENV, **wandb_env()}}
    if address and "://" not in address and address != "auto":
        # Ray's helpers inside workers (Train's placement-group cleaner, the state API) look the
        # cluster up again; with several Ray instances on one machine they must be told which
        runtime_env["env_vars"]["RAY_ADDRESS"] = address
    if address:
        # a job's driver (`deepfleet submit`, KubeRay) gets the job's runtime env too; the same
        # WANDB_* keys in both are the same settings, not a conflict (ours win, key by key)
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        try:
            return ray.init(
                address=address, runtime_env=runtime_env, log_to_driver=verbose(), logging_level="ERROR"
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"no Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    cpus = num_cpus or max(os.cpu_count() or 1, 4)
    # inherited by Ray's processes
    os.environ.update({k: os.environ.get(k, v) for k, v in {**SERVE_ENV, **LOCAL_TRAIN_ENV}.items()})
    return ray.init(
        num_cpus=cpus,
        runtime_env=runtime_env,
        # the dashboard hosts the state API that Train's controller polls (and Tune needs it
        # to release placement groups between sequential trials); on loopback only
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="ERROR",
        configure_logging=quiet,
        log_to_driver=verbose(),
    )


def verbose() -> bool:
    """`deepfleet ... --verbose` (DEEPFLEET_VERBOSE=1): the output of Ray's actors and tasks (Ray
    Data's executors, Train's controller, Serve's replicas) is forwarded to this console, as Ray
    does by default. Without it that output stays in Ray's session logs, and training workers
    write theirs to the run's logs/ folder (jobs.tracking)."""
    return os.environ.get("DEEPFLEET_VERBOSE", "") not in ("", "0")
