"""Hyperparameter search: Ray Tune runs the train *driver* once per trial (Ray Train V2 style:
the trial function builds and fits its own TorchTrainer), ASHA stops trials behind their peers,
and the best finished trial is scored on the test split and registered as a `candidate`.

python -m jobs.tune configs/retinopathy.yaml --profile tiny [--set tune.num_samples=8] [--name SWEEP]

A sweep lives in `<output-dir>/<name>/`: `tune/` (Tune's experiment state), `trials/<trial id>/`
(each trial's ordinary run directory), `sweep.json` and `sweep.png`. Starting a sweep whose
name exists resumes it: finished trials are kept, unfinished ones continue from their last
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from jobs import tasks
from jobs.config import ConfigError, RecipeBase, recipe_from_dict, save_recipe, with_values
from jobs.errors import UserError
from jobs.storage import redact

TRIAL_DRIVER_CPU = 0.05  # the trial function only waits on its TorchTrainer; its workers hold the CPUs


# ---------------------------------------------------------------- the space


def metric_and_mode(recipe: RecipeBase) -> tuple[str, str]:
    metric = recipe.tune.metric or tasks.get(recipe.task).METRICS[0]
    reported = tasks.reported(recipe.task)
    if metric not in reported:
        raise UserError(
            f"tune.metric '{metric}' is not reported by the {recipe.task} task (it reports {', '.join(reported)})"
        )
    return metric, recipe.tune.mode or tasks.goal(recipe.task, metric)


def _domain(key: str, spec: dict):
    from ray import tune

    sampler, args = next(iter(spec.items()))
    try:
        return tune.choice(args) if sampler == "choice" else getattr(tune, sampler)(*args)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"tune.space.{key}: {sampler}{tuple(args)} is not a valid sampler ({e})") from None


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        for k in key.split(".")[:-1]:
            node = node.setdefault(k, {})
        node[key.rsplit(".", 1)[-1]] = value
    return out


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def base_trial_recipe(recipe: RecipeBase) -> RecipeBase:
    """The recipe with the sweep's fixed per-trial overrides applied (`tune.trial`)."""
    return with_values(recipe, recipe.tune.trial, "tune.trial")


def check_sweep(recipe: RecipeBase) -> dict:
    """Everything a sweep could trip over, before any trial starts: the metric, every key of the
    space and of the trial overrides, and a sampled value of each. Returns the nested space."""
    metric_and_mode(recipe)
    if not recipe.tune.space:
        raise UserError(f"the {recipe.task} recipe has an empty tune.space: nothing to search")
    base = base_trial_recipe(recipe)
    space = {}
    for key, spec in recipe.tune.space.items():
        domain = _domain(key, spec)
        values = spec["choice"] if "choice" in spec else [domain.sample() for _ in range(3)]
        for value in values:
            try:
                with_values(base, {key: value.item() if hasattr(value, "item") else value}, "tune.space")
            except ConfigError as e:
                raise UserError(str(e)) from None
        space[key] = domain
    return _nest(space)


def trial_recipe(base: RecipeBase, params: dict, trial_id: str, sweep_dir: Path, sweep: str) -> RecipeBase:
    flat = {k: v.item() if hasattr(v, "item") else v for k, v in flatten(params).items()}
    recipe = with_values(base, flat, f"trial {trial_id}")
    recipe.run.output_dir = str(sweep_dir / "trials")
    recipe.run.name = trial_id
    recipe.wandb.group = sweep  # one W&B run per trial, grouped per sweep
    return recipe


def defaults_point(recipe: RecipeBase, base: RecipeBase) -> dict | None:
    """The recipe's own values of the searched keys, as a (nested) point of the space. A key left
    to the model flavour (None) is sampled: the point is then partly the recipe's."""
    own = {k: _get(base, k) for k in recipe.tune.space}
    return _nest({k: v for k, v in own.items() if v is not None}) or None


def trials_at_once(recipe: RecipeBase, resources: dict) -> int:
    """Trials that fit the cluster side by side: each needs its workers' CPUs (and GPUs) plus a
    CPU for its Ray Data pipeline; more would starve each other's data or never get workers."""
    if recipe.tune.max_concurrent:
        return recipe.tune.max_concurrent
    s = recipe.scaling
    n = int(resources.get("CPU", 0) // (s.num_workers * s.cpus_per_worker + 1))
    if s.use_gpu:
        gpus = recipe.tune.gpus_per_trial or s.num_workers
        n = min(n, int(resources.get("GPU", 0) // gpus))
    return max(1, n)


# ---------------------------------------------------------------- one trial


def _validations(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []
    return [ln for ln in lines if ln.get("kind") == "val"]


def run_trial(config: dict, base: dict, sweep_dir: str, sweep: str) -> None:
    """Tune's trainable: one trial is one ordinary training run (driver + TorchTrainer)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import train

    trial_id = tune.get_context().get_trial_id()
    recipe = trial_recipe(recipe_from_dict(base), config, trial_id, Path(sweep_dir), sweep)
    done = _validations(recipe.run_dir)
    if done and done[-1]["epoch"] >= recipe.train.epochs:
        # Tune's experiment state can lag a killed sweep driver by a few seconds: a trial that
        # already trained to the end reports its epochs again instead of training twice
        for line in done:
            tune.report({k: v for k, v in line.items() if k not in ("kind", "time")})
        return
    train(recipe, callbacks=[TuneReportCallback()], echo=False, export=False, check_fit=False)


# ---------------------------------------------------------------- the sweep


def _printer(metric: str, max_t: int):
    from ray import tune

    class SweepProgress(tune.Callback):
        """One line per trial event on the driver (Tune's own table is off)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in flatten(trial.config).items())
            _say(f"trial {trial.trial_id} started: {shown}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result:
                _say(f"trial {trial.trial_id} epoch {result.get('epoch')}: {metric} {result[metric]:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            how = "finished" if epoch >= max_t else f"stopped early by the scheduler after epoch {epoch}"
            _say(f"trial {trial.trial_id} {how}")

        def on_trial_error(self, iteration, trials, trial, **info):
            _say(f"trial {trial.trial_id} failed: see {trial.path}/error.txt")

    return SweepProgress()


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _search(recipe: RecipeBase, defaults: dict | None, at_once: int):
    t = recipe.tune
    points = [defaults] if defaults else None
    if t.search.name == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("tune.search optuna needs the optuna package: pip install optuna") from None
        # Optuna takes whole points, keyed by the flattened "section/field" names
        whole = defaults and len(flatten(defaults)) == len(t.space)
        points = [{k.replace(".", "/"): v for k, v in flatten(defaults).items()}] if whole else None
        return OptunaSearch(points_to_evaluate=points, seed=t.search.seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune applies max_concurrent_trials to Searchers only: the variant generator takes its own
    return BasicVariantGenerator(
        points_to_evaluate=points, random_state=t.search.seed, max_concurrent=at_once
    )


class ResumableASHA(ASHAScheduler):
    """ASHA that keeps its rungs beside the sweep. Tune checkpoints the searcher but not the
    scheduler: a resumed sweep would judge its remaining trials against empty rungs."""

    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path, self._loaded = state_path, False

    def _load(self) -> None:
        if not self._loaded and Path(self._state_path).is_file():
            self.restore(self._state_path)
        self._loaded = True

    def _save(self) -> None:
        tmp = f"{self._state_path}.tmp"
        self.save(tmp)
        os.replace(tmp, self._state_path)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def _scheduler(recipe: RecipeBase, max_t: int, state: Path):
    from ray.tune.schedulers import FIFOScheduler

    s = recipe.tune.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    # time is the epoch the worker reports, not Tune's report count: a resumed trial keeps its place
    return ResumableASHA(
        str(state),
        time_attr="epoch",
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _tuner(
    recipe, base, space: dict, sweep_dir: Path, name: str, goal: tuple[str, str], at_once: int, defaults
):
    """A new Tuner over the space, or the one a killed sweep left (its finished trials kept)."""
    from ray import tune

    metric, mode = goal
    max_t = base.train.epochs
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=base.model_dump(mode="json"), sweep_dir=str(sweep_dir), sweep=name
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    storage = sweep_dir / "tune"
    run_config = tune.RunConfig(
        name=storage.name,
        storage_path=str(storage.parent),
        verbose=0,
        callbacks=[_printer(metric, max_t)],
        failure_config=tune.FailureConfig(max_failures=0),
    )
    if tune.Tuner.can_restore(str(storage)):
        _say(f"resuming sweep {sweep_dir}: finished trials are kept")
        tuner = tune.Tuner.restore(
            str(storage), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        _say(
            f"sweep {name}: {recipe.tune.num_samples} trials, {at_once} at a time, ranked by {metric} ({mode}), "
            f"{recipe.tune.scheduler.name} over {max_t} epochs"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=recipe.tune.num_samples,
                max_concurrent_trials=at_once,
                search_alg=_search(recipe, defaults, at_once),
                scheduler=_scheduler(recipe, max_t, sweep_dir / "asha.pkl"),
                trial_name_creator=_trial_dirname,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=run_config,
        )
    return tuner


def _register_best(
    recipe, base, best: dict, sweep_dir: Path, name: str, manifest: dict
) -> tuple[dict, bool | None]:
    """Export the best trial's last checkpoint, score it on the test split and register it (and
    promote it when the recipe says so); its registry entry and whether it reached production."""
    from ray.train import Checkpoint

    from jobs.promote import promote, register_run
    from jobs.train import finish

    best_recipe = trial_recipe(base, best["config"], best["trial_id"], sweep_dir, name)
    # Train names checkpoint directories by time: the last one closes the last epoch
    last = sorted(p for p in best_recipe.run_dir.glob("checkpoint_*") if (p / "state.json").is_file())[-1]
    best["summary"] = finish(best_recipe, Checkpoint(str(last)), manifest)
    best["model"] = best["summary"]["paths"]["model"]
    entry = register_run(
        best_recipe,
        lineage={"sweep": str(sweep_dir), "trial": best["trial_id"], "wandb_group": name},
    )
    promoted = None
    if recipe.registry.auto_promote:
        try:
            promoted = promote(recipe, entry["version"], why=f"best of sweep {name}")["stage"] == "production"
        except UserError as e:
            _say(str(e))
            promoted = False
    return entry, promoted


def same_sweep(recipe: RecipeBase, sweep_dir: Path) -> None:
    """A killed sweep resumes under the space, samples and scheduler Tune saved, with the trial
    recipe it started with: started again with other ones, it refuses naming what differs."""
    import yaml

    previous = sweep_dir / "config.yaml"
    if not (previous.is_file() and (sweep_dir / "tune").exists()):
        return
    old = recipe_from_dict(yaml.safe_load(previous.read_text()))
    was, now = old.tune.model_dump(mode="json"), recipe.tune.model_dump(mode="json")
    changed = [f"tune.{k}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if base_trial_recipe(old).config_hash() != base_trial_recipe(recipe).config_hash():
        changed.append("trial recipe (model, data or training settings)")
    if changed:
        raise UserError(
            f"sweep {sweep_dir} was started with another {', '.join(changed)}: start a new sweep "
            "(--name), or start it again as it was"
        )


def sweep(recipe: RecipeBase, address: str | None = None) -> dict:
    """Run (or resume) the recipe's sweep; register the best model; write sweep.json."""
    from cluster.local import connect
    from jobs.train import check_memory, check_recipe, prepare_data

    # 1. everything checked, the data prepared once, before any trial starts
    metric, mode = metric_and_mode(recipe)
    space = check_sweep(recipe)
    base = base_trial_recipe(recipe)
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    check_recipe(base, embedded)
    name = recipe.run.name or f"{recipe.task}-{recipe.profile or 'default'}-sweep"
    sweep_dir = Path(recipe.run.output_dir).expanduser().resolve() / name
    # paths travel to trials on other nodes: absolute (shared storage on clusters)
    recipe.data.root = base.data.root = str(Path(recipe.data.root).expanduser().resolve())
    manifest = prepare_data(base)  # once, before the trials (they reuse the shards)
    same_sweep(recipe, sweep_dir)
    save_recipe(recipe, sweep_dir / "config.yaml")

    connect(address)
    import ray

    check_memory(base, embedded)  # once, not per trial
    at_once = trials_at_once(base, ray.cluster_resources())
    max_t = base.train.epochs
    defaults = defaults_point(recipe, base) if recipe.tune.include_defaults else None
    tic, started = time.perf_counter(), time.time()
    storage = sweep_dir / "tune"  # Tune's own state: what a killed sweep resumes from
    tuner = _tuner(recipe, base, space, sweep_dir, name, (metric, mode), at_once, defaults)
    # 2. the trials
    grid = tuner.fit()
    wall = time.perf_counter() - tic
    if grid.num_terminated + grid.num_errors < len(grid):  # Ctrl-C: Tune saved its state and returned
        raise UserError(f"sweep {name} interrupted: start the same command again to resume it")

    trials = [_trial_summary(r, sweep_dir, metric, max_t) for r in grid]
    trials.sort(key=lambda t: t["trial_id"])
    finished = [t for t in trials if t["epochs"] >= max_t]
    if not finished:
        raise UserError(f"sweep {name}: no trial trained to its last epoch (see {storage})")
    sign = 1 if mode == "max" else -1
    best = max(finished, key=lambda t: sign * t["metrics"][metric])
    default_trial = next((t for t in trials if defaults and _same(t["config"], defaults)), None)

    # 3. the winner: export its last checkpoint, score it on the test split, register it
    entry, promoted = _register_best(recipe, base, best, sweep_dir, name, manifest)
    summary = {
        "sweep": name,
        "task": recipe.task,
        "metric": metric,
        "mode": mode,
        "scheduler": recipe.tune.scheduler.name,
        "search": recipe.tune.search.name,
        "max_epochs": max_t,
        "trials_at_once": at_once,
        "num_trials": len(trials),
        "stopped_early": sum(t["stopped_early"] for t in trials),
        "trial_epochs": sum(t["epochs"] for t in trials),
        "best": best,
        "defaults": default_trial,
        "registered": {
            "registry": redact(recipe.registry.uri),
            "version": entry["version"],
            "stage": "production" if promoted else entry["stage"],
            "test_metrics": entry["test_metrics"],
        },
        "data_fingerprint": manifest["fingerprint"],
        "wall_s": round(wall, 1),
        "started": round(started, 3),
        "trials": trials,
        "paths": {"sweep_dir": str(sweep_dir), "tune": str(storage), "plot": str(sweep_dir / "sweep.png")},
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    plot_sweep(trials, metric, best["trial_id"], sweep_dir / "sweep.png")
    return summary


def _get(recipe: RecipeBase, key: str):
    node: Any = recipe
    for k in key.split("."):
        node = getattr(node, k)
    return node


def _same(config: dict, point: dict) -> bool:
    a, b = flatten(config), flatten(point)
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k]) if isinstance(b[k], float) else a[k] == b[k] for k in b
    )


def _trial_summary(result, sweep_dir: Path, metric: str, max_t: int) -> dict:
    """A trial from its own run directory: every validation it ran (across restarts)."""
    # Tune names the trial's own directory after the trial id, but a resumed sweep gives a trial
    # that had started, unrecorded, before the kill a new one (`<id>_<4 hex>`): the id it reports
    # under is the one its run directory has
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    run_dir = sweep_dir / "trials" / trial_id
    validations = _validations(run_dir)
    last = validations[-1] if validations else {}
    epochs = last.get("epoch", 0)
    return {
        "trial_id": trial_id,
        "config": result.config,
        "metrics": {k: v for k, v in last.items() if isinstance(v, float) and k != "time"},
        "epochs": epochs,
        # when each validation ended (seconds since the epoch, the worker's clock): the order
        # epochs completed in across trials, and the wall time to a score
        "history": [{"epoch": v["epoch"], metric: v.get(metric), "time": v.get("time")} for v in validations],
        "stopped_early": result.error is None and epochs < max_t,
        "error": str(result.error).strip().splitlines()[-1] if result.error else None,
        "run_dir": str(run_dir),
        "model": None,
    }


def plot_sweep(trials: list[dict], metric: str, best: str, path: Path) -> None:
    """Validation metric per epoch of every trial: where ASHA stopped which trial, and the winner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        xs = [h["epoch"] for h in t["history"]]
        ys = [h[metric] for h in t["history"]]
        if not xs:
            continue
        style = {"lw": 2.5, "color": "black"} if t["trial_id"] == best else {"lw": 1, "alpha": 0.7}
        ax.plot(
            xs, ys, marker="o", linestyle="--" if t["stopped_early"] else "-", label=t["trial_id"], **style
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{len(trials)} trials (dashed: stopped early; black: best {best})")
    ax.legend(fontsize=6, ncol=2)
    tasks.save_figure(fig, path.parent, path.name, dpi=110)


def main(argv: list[str] | None = None) -> None:
    from jobs.cli import main as cli

    cli(["tune", *(argv or [])])


if __name__ == "__main__":
    main(sys.argv[1:])
