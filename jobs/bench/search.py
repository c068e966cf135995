"""Search: ASHA against random search with the same space, seeds and budget.

One task's sweep runs twice through `jobs.tune.sweep`, one after the other on the same embedded
cluster: once with the ASHA scheduler, once with FIFO (random search: every trial runs all its
epochs). Both sweeps draw their trials from the same space with the same searcher seed and
num_samples, train on the same shards for the same number of epochs, two trials at a time; the
only difference is that ASHA may stop a trial early. The sampled configurations are checked to
be the same, trial by trial.

The space is the task's *production* search space (the recipe's top-level `tune.space`, what a
real sweep searches), run on the tiny model and a subset of the tiny data so that a trial costs
seconds of compute (plus Ray's per-trial start-up). The recipe's own defaults are not a trial
(`include_defaults: false`): random search means random points.

Target score. Both sweeps together define it, so it favours neither:

    target = trivial + FRACTION * (best - trivial)

`trivial` is the task's trivial predictor on the validation split (`tasks.<task>.baseline`:
the popularity ranking for recsys), `best` the best validation score any trial of either sweep
reached at any epoch, FRACTION = 0.9: a configuration that closes 90% of the gap between the
trivial predictor and the best the space produced here. (`best` is in practice the random
search's: it trains every sampled configuration to the end.)

Cost to target. All validations of a sweep, every trial and epoch, are put in the order they
completed (the worker's timestamp of each validation); the trial-epochs to target are how many
of them had completed when the best score so far first reached the target, the wall time to
target is that validation's time since the sweep started (Ray's per-trial start-up included).
A sweep that never reaches it has no cost to target (None); the ratio ASHA / random of the
trial-epochs to target must be at most 0.5.

What decides the ratio is reported beside it: how many sampled configurations reach the target
and the earliest epoch one does (random search pays max_epochs for every configuration before
the first that gets there; ASHA pays about one epoch for each it stops, but no less than the
epochs the winning configuration itself needs, plus what runs beside it), and how far the same
configuration's score moves between the two sweeps (training is not bit-reproducible across
runs). `replay` re-runs ASHA's rule (Ray's asynchronous bracket) and FIFO on the random search's
own learning curves in 200 orders of the same trials: whether the measured ratio is the order's
luck or the curves'. On the tiny recsys recipe the space's top is flat (half the configurations
end within noise of the best), so random search reaches the target with its first trials and no
scheduler can halve that; the numbers of a run say by how much.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jobs.bench import target

FRACTION = 0.9  # of the way from the trivial predictor to the best score either sweep reached
BOUND = 0.5  # ASHA's trial-epochs to target / random search's
SEED = 0  # the searcher's seed, the same for both sweeps

# One sweep pair per plan. recsys: the tiny model on a third of the tiny data (800 sessions),
# one 1-CPU worker per trial so that two trials run side by side on the embedded cluster, no MF
# sibling. ASHA's rungs: grace_period x reduction_factor^k up to the last epoch (quick: 1, 2, 4;
# full: 1, 3). A trial costs ~1 min of start-up and 20-60 s per epoch on 2 busy cores (the train
# split's Ray Data pipeline runs again every epoch): measured, quick 21 min, full 19-41 min.
RECSYS_TRIAL = {
    "baselines.mf": False,
    "scaling.num_workers": 1,
    "data.num_tracks": 600,
    "data.num_users": 100,
    "data.num_sessions": 800,
}
PLANS = {
    "recsys": {
        "quick": {
            "num_samples": 6,
            "epochs": 4,
            "grace_period": 1,
            "reduction_factor": 2,
            "trial": RECSYS_TRIAL,
        },
        "full": {
            "num_samples": 8,
            "epochs": 6,
            "grace_period": 1,
            "reduction_factor": 3,
            "trial": RECSYS_TRIAL,
        },
    },
}
ORDER = ("recsys",)  # the cheapest trial first: the section measures one task


# ---------------------------------------------------------------- the measure (pure)


def validations(trials: list[dict], metric: str) -> list[dict]:
    """Every validation of every trial, in the order they completed: {trial, epoch, score, time}.
    A trial's history without timestamps keeps its own order and is placed after the timed ones."""
    out = []
    for t in trials:
        for i, h in enumerate(t["history"]):
            score = h.get(metric)
            if score is None or (isinstance(score, float) and math.isnan(score)):
                score = None
            out.append(
                {"trial": t["trial_id"], "epoch": h["epoch"], "score": score, "time": h.get("time"), "i": i}
            )
    out.sort(key=lambda v: (v["time"] is None, v["time"] or 0.0, v["trial"], v["i"]))
    for v in out:
        del v["i"]
    return out


def cost_to_target(
    trials: list[dict], metric: str, bound: float, mode: str = "max", started: float | None = None
) -> dict:
    """Trial-epochs (and wall seconds since `started`) spent until the best score so far first
    reached `bound`; None where it never did."""
    sign = 1.0 if mode == "max" else -1.0
    best = None
    for n, v in enumerate(validations(trials, metric), start=1):
        if v["score"] is not None and (best is None or sign * v["score"] > sign * best):
            best = v["score"]
        if best is not None and sign * best >= sign * bound:
            wall = v["time"] - started if v["time"] is not None and started is not None else None
            return {"trial_epochs": n, "wall_s": wall, "trial": v["trial"], "epoch": v["epoch"]}
    return {"trial_epochs": None, "wall_s": None, "trial": None, "epoch": None}


def best_score(trials: list[dict], metric: str, mode: str = "max") -> float | None:
    scores = [v["score"] for v in validations(trials, metric) if v["score"] is not None]
    if not scores:
        return None
    return max(scores) if mode == "max" else min(scores)


def target_score(trivial: float, best: float, fraction: float = FRACTION) -> float:
    """The score `fraction` of the way from the trivial predictor to the best (either direction)."""
    return trivial + fraction * (best - trivial)


def trivial_score(baseline: dict, metric: str) -> float | None:
    """The metric of the task's trivial predictor: flat (retinopathy, autonomous) or one level
    down (recsys: {"popularity": {...}, "mf": {...}}; the first predictor that has it)."""
    if isinstance(baseline.get(metric), (int, float)):
        return float(baseline[metric])
    for value in baseline.values():
        if isinstance(value, dict) and isinstance(value.get(metric), (int, float)):
            return float(value[metric])
    return None


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end in the trial's index in the searcher's order: `<experiment>_00003`."""
    return int(trial_id.rsplit("_", 1)[-1])


def same_configs(a: list[dict], b: list[dict]) -> bool:
    """Whether two sweeps ran the same configurations, trial index by trial index."""
    from jobs.tune import flatten

    def by_index(trials):
        return {trial_index(t["trial_id"]): flatten(t["config"]) for t in trials}

    x, y = by_index(a), by_index(b)
    if x.keys() != y.keys():
        return False
    for i in x:
        if x[i].keys() != y[i].keys():
            return False
        for k, v in x[i].items():
            w = y[i][k]
            same = math.isclose(v, w, rel_tol=1e-9) if isinstance(v, float) else v == w
            if not same:
                return False
    return True


def causes(asha: dict, random: dict, bound: float | None) -> dict:
    """What decides the ratio, from the random search (every configuration to its last epoch):
    the share of sampled configurations that reach the target at any epoch, and the earliest epoch
    one does (no scheduler spends less than that on the trial that gets there); and how much the
    same configuration's score moves between the two sweeps at the same epoch (run-to-run noise,
    against the target's distance from the best)."""
    metric, sign = random["metric"], (1.0 if random["mode"] == "max" else -1.0)
    reach = []
    for t in random["trials"]:
        hit = [
            h["epoch"] for h in t["history"] if h.get(metric) is not None and sign * h[metric] >= sign * bound
        ]
        reach.append(min(hit) if hit else None)
    hits = [e for e in reach if e is not None]
    scores = {}
    for name, s in (("asha", asha), ("random", random)):
        for t in s["trials"]:
            for h in t["history"]:
                if h.get(metric) is not None:
                    scores.setdefault((trial_index(t["trial_id"]), h["epoch"]), {})[name] = h[metric]
    deltas = sorted(abs(v["asha"] - v["random"]) for v in scores.values() if len(v) == 2)
    return {
        "reaching_share": len(hits) / max(len(reach), 1) if bound is not None else None,
        "reaching": sum(e is not None for e in reach),
        "first_epoch_reaching": min(hits) if hits else None,
        "repeat_pairs": len(deltas),
        "repeat_noise_median": deltas[len(deltas) // 2] if deltas else None,
        "repeat_noise_max": deltas[-1] if deltas else None,
    }


def compare(asha: dict, random: dict, trivial: float, fraction: float = FRACTION) -> dict:
    """Both sweeps' summaries (sweep.json) -> the figures of the section."""
    metric, mode = asha["metric"], asha["mode"]
    best = [best_score(s["trials"], metric, mode) for s in (asha, random)]
    known = [b for b in best if b is not None]
    overall = (max(known) if mode == "max" else min(known)) if known else None
    bound = target_score(trivial, overall, fraction) if overall is not None else None
    out = {
        "metric": metric,
        "mode": mode,
        "trivial": trivial,
        "best_either": overall,
        "fraction": fraction,
        "target_score": bound,
        "same_configs": same_configs(asha["trials"], random["trials"]),
    }
    for name, s, b in (("asha", asha, best[0]), ("random", random, best[1])):
        reached = (
            cost_to_target(s["trials"], metric, bound, mode, s.get("started")) if bound is not None else {}
        )
        out[name] = {
            "trials": s["num_trials"],
            "trial_epochs": sum(len(t["history"]) for t in s["trials"]),
            "stopped_early": s["stopped_early"],
            "best": b,
            "best_trial_finished": s["best"]["trial_id"],
            "wall_s": s["wall_s"],
            "to_target": reached,
            "epochs_per_trial": {t["trial_id"]: len(t["history"]) for t in s["trials"]},
        }
    out["causes"] = causes(asha, random, bound)
    a, r = out["asha"]["to_target"].get("trial_epochs"), out["random"]["to_target"].get("trial_epochs")
    out["ratio_trial_epochs"] = a / r if a is not None and r else None
    aw, rw = out["asha"]["to_target"].get("wall_s"), out["random"]["to_target"].get("wall_s")
    out["ratio_wall"] = aw / rw if aw is not None and rw else None
    out["ratio_total_trial_epochs"] = out["asha"]["trial_epochs"] / max(out["random"]["trial_epochs"], 1)
    return out


# ---------------------------------------------------------------- replay (what the order cost)


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The milestones of Ray's ASHA bracket (one bracket): grace x rf^k, k = 0 .. log_rf(max_t/grace)."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(n)]


def replay(
    curves: list[list[float]],
    order: list[int],
    scheduler: str,
    grace_period: int = 1,
    reduction_factor: float = 3.0,
    slots: int = 2,
    startup: float = 1.0,
) -> list[dict]:
    """Validations {trial, epoch, score, time} of a sweep replayed on known learning curves (the
    random search's: every sampled configuration, every epoch), trials started in `order`,
    `slots` at a time; an epoch costs 1, a trial's start-up `startup`. `asha` applies Ray's
    asynchronous rule: at each rung a trial goes on when its score is at least the
    (1 - 1/rf) percentile of the scores recorded at that rung so far (max mode)."""
    import heapq

    import numpy as np

    max_t = min(len(c) for c in curves)
    rungs = sorted(asha_rungs(grace_period, reduction_factor, max_t), reverse=True)
    recorded: dict[float, dict[int, float]] = {m: {} for m in rungs}
    queue, events, out = list(order), [], []
    seq = 0

    def start(trial: int, now: float) -> None:
        nonlocal seq
        heapq.heappush(events, (now + startup + 1.0, seq, trial, 1))
        seq += 1

    for _ in range(min(slots, len(queue))):
        start(queue.pop(0), 0.0)
    while events:
        now, _, trial, epoch = heapq.heappop(events)
        score = curves[trial][epoch - 1]
        out.append({"trial": trial, "epoch": epoch, "score": score, "time": now})
        stop = epoch >= max_t
        if scheduler == "asha" and not stop:
            for milestone in rungs:  # as ray.tune.schedulers.async_hyperband._Bracket.on_result
                if epoch < milestone or trial in recorded[milestone]:
                    continue
                if recorded[milestone]:
                    cutoff = np.nanpercentile(
                        list(recorded[milestone].values()), (1 - 1 / reduction_factor) * 100
                    )
                    stop = bool(score < cutoff)
                recorded[milestone][trial] = score
                break
        if stop:
            if queue:
                start(queue.pop(0), now)
        else:
            heapq.heappush(events, (now + 1.0, seq, trial, epoch + 1))
            seq += 1
    return out


def replay_ratios(
    curves: list[list[float]],
    bound: float,
    grace_period: int,
    reduction_factor: float,
    slots: int = 2,
    startup: float = 1.0,
    orders: int = 200,
    seed: int = 0,
) -> dict:
    """ASHA / random trial-epochs to `bound` over `orders` random orders of the same trials (the
    first is the sampled order): how much the one measured order owes to luck."""
    import random as rnd

    gen = rnd.Random(seed)
    n = len(curves)
    ratios = []
    for k in range(orders):
        order = list(range(n))
        if k:
            gen.shuffle(order)
        cost = {}
        for name in ("asha", "random"):
            events = replay(curves, order, name, grace_period, reduction_factor, slots, startup)
            hist = [{"trial_id": f"t_{i:05d}", "history": []} for i in range(n)]
            for v in events:
                hist[v["trial"]]["history"].append({"epoch": v["epoch"], "s": v["score"], "time": v["time"]})
            cost[name] = cost_to_target(hist, "s", bound)["trial_epochs"]
        ratios.append(cost["asha"] / cost["random"] if cost["asha"] and cost["random"] else None)
    known = sorted(r for r in ratios if r is not None)
    return {
        "orders": orders,
        "sampled_order": ratios[0],
        "median": known[len(known) // 2] if known else None,
        "met_share": sum(r is not None and r <= BOUND for r in ratios) / orders,
        "missed_share": sum(r is None for r in ratios) / orders,
    }


# ---------------------------------------------------------------- the sweeps


def _configs_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def make_recipe(task: str, plan: dict, scheduler: str, work_dir: Path):
    """The task's tiny recipe searching its production space (the recipe's top-level tune.space)
    with the plan's trial overrides, epochs, samples, seed and scheduler."""
    from jobs.config import load_recipe

    path = _configs_dir() / f"{task}.yaml"
    production = load_recipe(path).tune.space
    recipe = load_recipe(
        path,
        "tiny",
        [
            f"data.root={work_dir / 'data' / task}",
            f"run.output_dir={work_dir / 'runs'}",
            f"run.name={task}-{scheduler}",
            f"registry.uri={work_dir / 'registry' / scheduler}",
            f"tune.num_samples={plan['num_samples']}",
            "tune.include_defaults=false",
            "tune.search.name=random",
            f"tune.search.seed={SEED}",
            f"tune.scheduler.name={'asha' if scheduler == 'asha' else 'fifo'}",
            f"tune.scheduler.grace_period={plan['grace_period']}",
            f"tune.scheduler.reduction_factor={plan['reduction_factor']}",
        ],
    )
    recipe.tune.space = production
    recipe.tune.trial = {**plan["trial"], "train.epochs": plan["epochs"]}
    recipe.tune.max_concurrent = plan.get("max_concurrent")
    return type(recipe).model_validate(recipe.model_dump(mode="json"))


@contextlib.contextmanager
def own_cluster(num_cpus: int | None = None) -> Iterator[str]:
    """A cluster for the sweeps: the one this process has joined, else a new local one that knows
    its own address.

    Train's PlacementGroupCleaner (the detached actor that frees a trial's worker placement group
    when ASHA stops the trial) finds its cluster through the state API; on a machine with more
    than one Ray instance and no RAY_ADDRESS it gives up ("Found multiple active Ray instances"),
    every stopped trial keeps its worker's CPU, and the next trials' Ray Data tasks wait for a
    CPU forever. So the local cluster gets a GCS port chosen here (RAY_GCS_SERVER_PORT) and its
    own address in every worker's environment (RAY_ADDRESS in the job's runtime env)."""
    import ray

    from cluster.local import DEFAULT_ENV, connect, wandb_env

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",  # a new cluster, whatever RAY_ADDRESS says
            num_cpus=num_cpus or max(os.cpu_count() or 1, 4),  # as cluster.local.connect
            runtime_env={"env_vars": {**DEFAULT_ENV, **wandb_env(), "RAY_ADDRESS": address}},
            include_dashboard=True,  # Tune releases placement groups through it
            dashboard_host="127.0.0.1",
            logging_level="ERROR",
        )
        os.environ["RAY_ADDRESS"] = address  # the driver's own state-API lookups
        connect(address)  # joined already: sets the driver-side defaults (DataContext, accelerator)
        yield address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_pair(task: str, plan: dict, work_dir: Path, progress: Callable[[str], None], address=None) -> dict:
    """Both sweeps of one plan, from scratch (an earlier bench's sweeps are removed, not resumed)."""
    from jobs.tune import sweep

    out = {}
    for scheduler in ("random", "asha"):
        recipe = make_recipe(task, plan, scheduler, work_dir)
        shutil.rmtree(Path(recipe.run.output_dir) / recipe.run.name, ignore_errors=True)
        shutil.rmtree(recipe.registry.uri, ignore_errors=True)
        progress(
            f"{task}: {scheduler} sweep, {plan['num_samples']} trials x {plan['epochs']} epochs"
            + (
                f" (grace {plan['grace_period']}, reduction {plan['reduction_factor']:g})"
                if scheduler == "asha"
                else ""
            )
        )
        tic = time.perf_counter()
        out[scheduler] = sweep(recipe, address=address)
        progress(
            f"{task}: {scheduler} sweep done in {time.perf_counter() - tic:.0f} s, "
            f"{out[scheduler]['trial_epochs']} trial-epochs, {out[scheduler]['stopped_early']} stopped early"
        )
    return out


def run(tasks: list[str], quick: bool, work_dir: Path, progress: Callable[[str], None]) -> dict:
    chosen = next((t for t in ORDER if t in tasks), None)
    if chosen is None:
        return {
            "skipped": f"the search section runs on {', '.join(ORDER)} (the cheapest trial); "
            f"asked for {', '.join(tasks)}"
        }
    plan = PLANS[chosen]["quick" if quick else "full"]
    work_dir = Path(work_dir).resolve()
    with own_cluster() as address:
        sweeps = run_pair(chosen, plan, work_dir, progress, address)
    asha, random = sweeps["asha"], sweeps["random"]
    baseline = random["best"]["summary"]["baseline"]
    trivial = trivial_score(baseline, random["metric"])
    result = {"task": chosen, "plan": plan, "seed": SEED, **compare(asha, random, trivial)}
    result["sweep_dirs"] = {k: s["paths"]["sweep_dir"] for k, s in sweeps.items()}
    result["replay"] = replay_section(random, result["target_score"], plan)
    if not result["same_configs"]:
        progress("search: the two sweeps did not sample the same configurations: the comparison is void")
    progress(
        f"search: target {result['metric']} {_num(result['target_score'])}; trial-epochs to target "
        f"asha {result['asha']['to_target'].get('trial_epochs')}, random {result['random']['to_target'].get('trial_epochs')}"
    )
    return result


def replay_section(random: dict, bound: float | None, plan: dict) -> dict | None:
    """The measured order against other orders of the same trials: ASHA replayed on the random
    search's learning curves (which hold every configuration to its last epoch)."""
    metric = random["metric"]
    trials = sorted(random["trials"], key=lambda t: trial_index(t["trial_id"]))
    curves = [[h[metric] for h in t["history"]] for t in trials]
    if bound is None or random["mode"] != "max" or any(len(c) < random["max_epochs"] for c in curves):
        return None  # (a lower-is-better metric would replay on negated curves; none is searched here)
    return replay_ratios(
        curves, bound, plan["grace_period"], plan["reduction_factor"], slots=random["trials_at_once"]
    )


def _num(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows(result: dict) -> list[tuple[str, str, str]]:
    if "skipped" in result:
        return [("", "search", result["skipped"])]
    task, m = result["task"], result["metric"]
    plan = result["plan"]
    out = [
        (
            task,
            "plan",
            f"{plan['num_samples']} trials x {plan['epochs']} epochs, seed {result['seed']}, "
            f"ASHA grace {plan['grace_period']} reduction {plan['reduction_factor']:g}",
        ),
        (task, "same sampled configurations", "yes" if result["same_configs"] else "NO"),
        (
            task,
            f"target {m}",
            f"{_num(result['target_score'])} (trivial {_num(result['trivial'])} + "
            f"{result['fraction']:g} x (best {_num(result['best_either'])} - trivial))",
        ),
    ]
    for name, label in (("asha", "ASHA"), ("random", "random")):
        s = result[name]
        reached = s["to_target"]
        out += [
            (task, f"{label}: trial-epochs to target", str(reached.get("trial_epochs") or "not reached")),
            (
                task,
                f"{label}: wall to target",
                "-" if reached.get("wall_s") is None else f"{reached['wall_s']:.0f} s",
            ),
            (task, f"{label}: trial-epochs in all", f"{s['trial_epochs']} ({s['trials']} trials)"),
            (task, f"{label}: wall in all", f"{s['wall_s']:.0f} s"),
            (task, f"{label}: best {m}", _num(s["best"])),
            (task, f"{label}: trials stopped early", str(s["stopped_early"])),
        ]
    out += [
        (task, "ASHA / random: trial-epochs to target", _num(result["ratio_trial_epochs"], 3)),
        (task, "ASHA / random: wall to target", _num(result["ratio_wall"], 3)),
        (task, "ASHA / random: trial-epochs in all", _num(result["ratio_total_trial_epochs"], 3)),
    ]
    c = result.get("causes")
    if c and c["reaching_share"] is not None:
        out += [
            (
                task,
                "configurations reaching the target",
                f"{c['reaching']} of {result['random']['trials']}, the earliest at epoch {c['first_epoch_reaching']}",
            ),
            (
                task,
                f"same configuration, same epoch, two sweeps: |d {m}|",
                f"median {_num(c['repeat_noise_median'])}, max {_num(c['repeat_noise_max'])} "
                f"({c['repeat_pairs']} pairs); target to best {_num(abs(result['best_either'] - result['target_score']))}",
            ),
        ]
    r = result.get("replay")
    if r:
        out += [
            (
                task,
                "replay: ASHA / random over trial orders",
                f"sampled order {_num(r['sampled_order'], 3)}; median of {r['orders']} orders "
                f"{_num(r['median'], 3)}; <= {BOUND:g} in {r['met_share']:.0%}, ASHA misses in {r['missed_share']:.0%}",
            )
        ]
    return out


def targets(result: dict) -> list[dict]:
    if "skipped" in result:
        return []
    task = result["task"]
    # a comparison of different configurations measures nothing: no value, not met
    ratio = result["ratio_trial_epochs"] if result["same_configs"] else None
    return [target("ASHA / random trial-epochs to target", task, ratio, BOUND, "<=")]
