"""`deepfleet COMMAND CONFIG [--profile NAME] [--set key.path=value ...]`; each is also `python -m jobs.<name>`."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.config import recipe_from_options

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, search and serve big models on Ray clusters with DeepSpeed.",
)
err = Console(stderr=True)
out = Console()

Profile = Annotated[
    str | None, typer.Option("--profile", "-p", help="Named profile of the recipe (tiny, full, ...).")
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe field: dotted.key=value (repeatable)."),
]
Address = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)."),
]
OutputDir = Annotated[str | None, typer.Option(help="Where run directories live (default ./runs).")]
Name = Annotated[str | None, typer.Option(help="Run name; a run whose name exists is resumed.")]
Config = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. configs/retinopathy.yaml.")]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Also show Ray's log lines, the workers' output and library warnings."
    ),
]


def _verbosity(verbose: bool) -> None:
    """--verbose reaches every part of the run through the environment (cluster.local.verbose)."""
    if verbose:
        os.environ["DEEPFLEET_VERBOSE"] = "1"


def user_facing(fn):
    """Mistakes a user can make end in one line on stderr and exit 1, never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from jobs.errors import user_errors

        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            # escaped: messages quote paths and C++ sources like "[/__w/.../pair.cc:545]"
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: start the same command again to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


def _metrics_table(title: str, metrics: dict, baseline: dict | None = None) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model", justify="right")
    # one baseline ({"predictor": ..., metric: value}) or several ({name: {metric: value}})
    several = bool(baseline) and all(isinstance(b, dict) for b in baseline.values())
    baselines = list(baseline.items()) if several else [("trivial", baseline)] if baseline else []
    for name, b in baselines:
        table.add_column(f"baseline ({b.get('predictor', name)})", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            row = [k, f"{v:.4f}"]
            for _, b in baselines:
                row.append(f"{b[k]:.4f}" if isinstance(b.get(k), float) else "")
            table.add_row(*row)
    return table


@app.command()
@user_facing
def prepare(config: Config, profile: Profile = None, set_: Sets = None):
    """Generate or import the recipe's data into Parquet shards with a manifest."""
    from jobs import tasks

    recipe = recipe_from_options(config, profile, set_)
    manifest = tasks.get(recipe.task).prepare(recipe)
    rows = {k: v["rows"] for k, v in manifest["splits"].items()}
    out.print(f"{recipe.data.root}: {rows} fingerprint {manifest['fingerprint'][:16]}")


@app.command()
@user_facing
def train(
    config: Config,
    profile: Profile = None,
    set_: Sets = None,
    address: Address = None,
    output_dir: OutputDir = None,
    name: Name = None,
    verbose: Verbose = False,
):
    """Train with DeepSpeed on Ray Train; export the model; write summary.json."""
    from jobs.train import train as run

    _verbosity(verbose)
    summary = run(recipe_from_options(config, profile, set_, output_dir, name), address=address)
    out.print(
        _metrics_table(
            f"{summary['run']}: validation after {summary['steps']} steps",
            summary["metrics"],
            summary["baseline"],
        )
    )
    out.print(
        f"samples/s {summary['samples_per_s'] or 0:.1f}  world {summary['world_size']}  ZeRO "
        f"{summary['zero_stage']}  {summary['dtype']}  wall {summary['wall_s']} s"
    )
    out.print(f"summary: {summary['paths']['run_dir']}/summary.json\nmodel:   {summary['paths']['model']}")


@app.command()
@user_facing
def evaluate(
    config: Config,
    profile: Profile = None,
    set_: Sets = None,
    output_dir: OutputDir = None,
    name: Name = None,
    split: str = typer.Option("test", help="Split to score."),
    model: str | None = typer.Option(None, help="Exported model folder (default: the run's model/)."),
):
    """Score an exported model on a split with torch alone; write metrics.json and plots."""
    from jobs.evaluate import evaluate as run

    recipe = recipe_from_options(config, profile, set_, output_dir, name)
    model_dir = Path(model) if model else recipe.run_dir / "model"
    result = run(model_dir, recipe.data.root, split=split)
    out.print(_metrics_table(f"exported model on the {split} split ({result['val_rows']} rows)", result))
    out.print(f"model:   {model_dir}\nmetrics: {Path(result['plots'][0]).parent / 'metrics.json'}")
    out.print(f"plots:   {', '.join(result['plots'])}")


@app.command()
@user_facing
def tune(
    config: Config,
    profile: Profile = None,
    set_: Sets = None,
    address: Address = None,
    output_dir: OutputDir = None,
    name: Annotated[
        str | None, typer.Option(help="Sweep name; a sweep whose name exists is resumed.")
    ] = None,
    verbose: Verbose = False,
):
    """Search the recipe's `tune.space` with Ray Tune (a full training run per trial); register the best."""
    from jobs.tune import flatten, sweep

    _verbosity(verbose)
    s = sweep(recipe_from_options(config, profile, set_, output_dir, name), address=address)
    table = Table(title=f"sweep {s['sweep']}: {s['num_trials']} trials, {s['stopped_early']} stopped early")
    params = flatten(s["trials"][0]["config"])
    for col in ("trial", "", "epochs", s["metric"], *params):
        table.add_column(col, justify="left" if col in ("trial", "") else "right")
    for t in s["trials"]:
        value = t["metrics"].get(s["metric"])
        role = "best" if t["trial_id"] == s["best"]["trial_id"] else ""
        if s["defaults"] and t["trial_id"] == s["defaults"]["trial_id"]:
            role = f"{role} defaults".strip()
        status = " stopped" if t["stopped_early"] else " failed" if t["error"] else ""
        table.add_row(
            t["trial_id"],
            role,
            f"{t['epochs']}{status}",
            f"{value:.4f}" if isinstance(value, float) else "",
            *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in flatten(t["config"]).values()),
        )
    out.print(table)
    r = s["registered"]
    out.print(
        f"test split of the best trial: {', '.join(f'{k} {v:.4f}' for k, v in r['test_metrics'].items() if isinstance(v, float))}"
    )
    out.print(f"registered: {s['task']} {r['version']} ({r['stage']}) in {r['registry']}")
    out.print(f"sweep:      {s['paths']['sweep_dir']}/sweep.json\nplot:       {s['paths']['plot']}")


@app.command()
@user_facing
def promote(
    config: Config,
    profile: Profile = None,
    set_: Sets = None,
    output_dir: OutputDir = None,
    name: Name = None,
    model: str | None = typer.Option(
        None, help="Exported model folder to register (default: the run's model/)."
    ),
    version: str | None = typer.Option(
        None, help="Move this registry version (e.g. v3) instead of registering."
    ),
    stage: str = typer.Option(
        "candidate", help="Stage to put the model in: candidate, production or archived."
    ),
    force: bool = typer.Option(False, help="Promote to production even when the recipe's gate refuses."),
):
    """Register a run's exported model (scored on the test split), or move a version between stages."""
    from jobs.promote import promote as to_production
    from jobs.promote import register_run
    from jobs.registry import Registry
    from jobs.storage import redact

    recipe = recipe_from_options(config, profile, set_, output_dir, name)
    if version is None:
        entry = register_run(recipe, Path(model) if model else None)
        out.print(
            _metrics_table(f"{recipe.task} {entry['version']} on the test split", entry["test_metrics"])
        )
        out.print(
            f"registered: {recipe.task} {entry['version']} ({entry['stage']}) in {redact(recipe.registry.uri)}"
        )
        version = entry["version"]
    if stage == "production":
        entry = to_production(recipe, version, force=force)
    elif version and stage != "candidate":
        entry = Registry(recipe.registry.uri).set_stage(recipe.task, version, stage, "moved by hand")
    else:
        return
    out.print(f"{recipe.task} {version} is now {entry['stage']}")


@app.command()
@user_facing
def models(
    registry: str = typer.Option("registry", help="Registry folder or URI (s3://, gs://, ...)."),
    task: str | None = typer.Option(None, help="Only this task's models."),
):
    """List the registry: every task's versions, their stage and test metrics."""
    from jobs import tasks as all_tasks
    from jobs.registry import Registry

    reg = Registry(registry)
    for name in [task] if task else reg.tasks():
        versions = reg.versions(name)
        metrics = all_tasks.reported(name)
        table = Table(title=f"{name} models in {reg.uri}")
        for col in ("version", "stage", *metrics, "registered", "from"):
            table.add_column(col, justify="right" if col in metrics else "left")
        for v in versions:
            lineage = v.get("lineage", {})
            origin = (
                f"sweep {Path(lineage['sweep']).name} trial {lineage['trial']}"
                if "sweep" in lineage
                else Path(lineage.get("run", "")).name
            )
            table.add_row(
                v["version"],
                v["stage"],
                *(
                    f"{v['test_metrics'][m]:.4f}" if isinstance(v["test_metrics"].get(m), float) else ""
                    for m in metrics
                ),
                v.get("registered", ""),
                origin,
            )
        out.print(table)
        for cut in reg.incomplete(name):
            out.print(
                f"note: {name} {cut} is incomplete (a registration cut short); it is skipped and may be deleted"
            )
    if not task and not reg.tasks():
        out.print(f"no models registered in {reg.uri}")


@app.command()
@user_facing
def submit(
    command: Annotated[list[str], typer.Argument(help="The deepfleet command to run, after --.")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray dashboard (jobs API) address, e.g. http://head:8265 "
            "(default: $RAY_ADDRESS, else http://127.0.0.1:8265)."
        ),
    ] = None,
    working_dir: Annotated[
        str, typer.Option(help="The checkout to send as the job's working directory.")
    ] = ".",
    wait: Annotated[bool, typer.Option(help="Stream the logs and exit with the job's status.")] = True,
):
    """Run a deepfleet command as a Ray job: deepfleet submit [--address URL] -- train CONFIG --profile NAME."""
    from jobs.submit import submit as run

    raise typer.Exit(run(command, address=address, working_dir=working_dir, wait=wait))


@app.command()
@user_facing
def serve(
    config: Annotated[
        Path | None, typer.Option(help="Serve config file, e.g. configs/serve/deepfleet.yaml.")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option(help="Task to serve (repeatable; default: every task in production).")
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="Registry folder or URI (default: ./registry, or the config's).")
    ] = None,
    canary: Annotated[
        list[str] | None, typer.Option(help="Serve a second version beside production: TASK=VERSION.")
    ] = None,
    canary_percent: Annotated[float, typer.Option(help="The canary's share of requests, 0-100.")] = 10,
    address: Address = None,
    host: Annotated[str, typer.Option(help="HTTP host of Serve's proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of Serve's proxy.")] = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding an API key that requests must carry (Bearer)."),
    ] = None,
):
    """Serve the registry's models on Ray Serve (HTTP, batching, autoscaling, canary, drift)."""
    from cluster.local import connect
    from jobs import serve as deploy
    from jobs.errors import UserError
    from jobs.registry import Registry

    canaries = dict(c.split("=", 1) for c in canary or [] if "=" in c)
    if len(canaries) != len(canary or []):
        raise UserError(f"--canary takes TASK=VERSION, got {', '.join(canary or [])}")
    if config:
        cfg = deploy.override(deploy.load(config), registry, api_key_env)
    else:
        registry = registry or "registry"
        tasks = task or [t for t in Registry(registry).tasks() if Registry(registry).production(t)]
        if not tasks:
            raise UserError(
                f"no model in production in {registry} (deepfleet promote ... --stage production)"
            )
        cfg = deploy.config_for(tasks, registry, host, port, canaries, canary_percent, api_key_env)
    deploy.check_models(cfg)
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    connect(address)
    if warning := deploy.gpu_warning(cfg):
        err.print(warning)
    out.print(f"deploying {', '.join(a['name'] for a in cfg['applications'])} ...")
    details = deploy.deploy(cfg, deploy.dashboard_url(), progress=out.print)
    for name, url in deploy.urls(details).items():  # plain lines: URLs must not be cut to fit a table
        out.print(
            f"{name}: POST {url}/predict   docs {url}/docs   GET {url}/health, {url}/drift", soft_wrap=True
        )
    if embedded:
        out.print("the embedded cluster serves while this command runs: Ctrl-C stops it")
        # `kill` and container stops end it like Ctrl-C (the cluster goes down with this process)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)


@app.command()
@user_facing
def canary(
    task: Annotated[str, typer.Argument(help="The application (task) whose canary moves.")],
    percent: Annotated[
        float, typer.Argument(help="The canary's new share of requests: 0 rolls back, 100 promotes.")
    ],
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else the local cluster).")
    ] = None,
):
    """Move a served canary's share of traffic in place: no restart, no dropped request."""
    from cluster.local import connect
    from jobs import serve as deploy

    connect(address or os.environ.get("RAY_ADDRESS") or "auto")
    deploy.set_canary(deploy.dashboard_url(), task, percent, progress=out.print)
    out.print(f"{task}: canary answers {percent:g}% of requests")


@app.command()
@user_facing
def plan(
    config: Config,
    profile: Profile = None,
    set_: Sets = None,
    gpu_memory: Annotated[float, typer.Option(help="Memory of one GPU in GB (80: an H100).")] = 80.0,
    gpus: Annotated[int, typer.Option(help="GPUs a node (host memory is per node).")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
):
    """Memory plan before a long run: model states and activations per GPU, GPUs needed, host memory."""
    from jobs.plan import GB, HEADROOM
    from jobs.plan import plan as make

    p = make(recipe_from_options(config, profile, set_), gpu_memory * GB, gpus)
    if as_json:
        out.print_json(data=p)
        return
    n, a, g, h = p["parameters"], p["activations"], p["gpu"], p["host"]
    out.print(
        f"{p['task']} ({p['profile'] or 'top level'}): {p['model']}, {n['total'] / 1e6:,.1f}M parameters "
        f"({n['trainable'] / 1e6:,.1f}M trainable); {p['dtype']} compute, fp32 weights, gradients and "
        "AdamW states",
        highlight=False,
    )
    offloaded = any(h[k] for k in ("weights", "gradients", "optimizer"))
    table = Table(
        title=f"GB per GPU at ZeRO {p['zero_stage']}{' + offload' if offloaded else ''} over {p['world']} GPUs"
    )
    for col in ("", "GPU", *(["host"] if offloaded else [])):
        table.add_column(col, justify="right" if col else "left")
    per = f"{a['per_sample'] / 1e6:,.1f} MB a sample + {a['per_step'] / 1e6:,.1f} MB a step"
    labels = {
        "weights": "weights",
        "gathered layer": "gathered layer (ZeRO 3)",
        "gradients": "gradients",
        "optimizer": "optimizer (fp32 master, AdamW)",
        "activations": f"activations (batch {a['batch_size']}: {per})",
        "headroom": f"headroom ({HEADROOM:.0%})",
        "total": "total",
    }
    host = {**h, "total": h["weights"] + h["gradients"] + h["optimizer"]}
    for key, label in labels.items():
        if g[key] or host.get(key):  # stage 3's gathered layer, offload's host share
            cells = [f"{g[key] / GB:,.2f}", f"{host[key] / GB:,.2f}" if key in host else ""]
            table.add_row(label, *cells[: 2 if offloaded else 1])
    out.print(table)
    verdict = "fit" if p["fits"] else f"do not fit ({g['total'] / GB:,.1f} GB)"
    needed = f"needs at least {p['gpus_needed']}" if p["gpus_needed"] else "fits on no number up to 1024"
    out.print(
        f"GPUs of {gpu_memory:g} GB: {needed}; the recipe's {p['world']} workers {verdict}\n"
        f"host memory per node: {p['gpus_per_node']} GPUs x {h['per gpu'] / GB:,.2f} GB = "
        f"{h['per node'] / GB:,.1f} GB (the larger of the offloaded states, {host['total'] / GB:,.2f} GB, "
        f"and the fp32 model each rank builds first, {4 * n['total'] / GB:,.2f} GB)\n"
        f"activations measured on {a['measured_on']} in {a['seconds']} s; plan {p['seconds']} s",
        highlight=False,
    )


@app.command()
@user_facing
def bench(
    task: Annotated[
        list[str] | None, typer.Option(help="Task to measure (repeatable; default: all three).")
    ] = None,
    section: Annotated[
        list[str] | None, typer.Option(help="train, ingest, serve or search (repeatable; default: all).")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="Fewer repeats and shorter runs (minutes, not an hour).")
    ] = False,
    results: Annotated[str, typer.Option("--out", help="Where the results go.")] = "bench.json",
    work_dir: Annotated[
        str, typer.Option(help="Data, runs and registry the benchmarks make.")
    ] = "runs/bench",
):
    """Measure deepfleet side by side: against plain PyTorch, the machine's peak, the DataLoader, a bare server."""
    from jobs.bench import bench as run
    from jobs.bench import rows

    try:
        result = run(task, section, quick=quick, out=results, work_dir=work_dir, progress=out_print)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    table = Table(
        title=f"deepfleet bench ({'quick' if quick else 'full'}) on {result['machine']['cores']} cores"
    )
    for col in ("section", "task", "measure", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for row in rows(result):
        table.add_row(*row)
    out.print(table)
    targets = Table(title="targets")
    for col in ("target", "task", "value", "bound", "met"):
        targets.add_column(col)
    for t in result["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        targets.add_row(
            t["name"], t["task"] or "", value, f"{t['op']} {t['target']:g}", "yes" if t["met"] else "NO"
        )
    out.print(targets)
    out.print(f"results: {Path(results).resolve()}")


config_app = typer.Typer(no_args_is_help=True, help="Recipes: show one resolved, with each field's doc.")
app.add_typer(config_app, name="config")


@config_app.command("show")
@user_facing
def config_show(config: Config, profile: Profile = None, set_: Sets = None):
    """Print the resolved recipe (file + profile + --set) as YAML, each field's doc as a comment."""
    from jobs.docs import annotated_yaml

    recipe = recipe_from_options(config, profile, set_)
    sets = "".join(f", --set {s}" for s in set_ or [])
    header = f"{config}, profile {profile or 'none'}{sets}: resolved by deepfleet config show"
    # plain stdout, not rich: YAML's [lists] would read as markup, and the output is meant to be saved
    typer.echo(annotated_yaml(recipe, header), nl=False)


def out_print(line: str) -> None:
    out.print(line, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="deepfleet")


if __name__ == "__main__":
    main()
