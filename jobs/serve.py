"""`deepfleet serve` and `deepfleet canary`: deploy the registry's models as Serve applications.

Deployment goes through Serve's declarative API (what `serve deploy` uses), so a config file,
`deepfleet serve` and KubeRay's RayService all describe the same thing, and a change of user_config
alone (canary share, batch size) reconfigures running replicas instead of restarting them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from jobs.errors import UserError

IMPORT_PATH = "serve.app:build"
DEPLOY_TIMEOUT_S = 600


def _field_errors(e: ValidationError, where: str) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}{'.' + loc if loc else ''}: {first['msg']}{more}"


def _unknown_keys(data: Any, schema: type[BaseModel], where: str) -> None:
    """Serve's schemas accept unknown keys silently (forward compatibility); a misspelt option
    would then do nothing. Reject them, naming the key."""
    if not isinstance(data, dict):
        return
    fields = schema.model_fields
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key '{key}' (valid: {', '.join(fields)})")
        annotation = fields[key].annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        for sub in inner:
            if issubclass(sub, BaseModel) and isinstance(value, dict):
                _unknown_keys(value, sub, f"{where}.{key}")
        if isinstance(value, list):
            item = next((a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)), None)
            if item is not None and issubclass(item, BaseModel):
                for i, v in enumerate(value):
                    _unknown_keys(v, item, f"{where}.{key}[{i}]")


def validate(config: dict, where: str = "serve config") -> dict:
    """A Serve config (the `serve deploy` format) checked strictly: Serve's own schema, no unknown
    keys, and our applications' args as ServeArgs. Returns it with registry paths made absolute."""
    from ray.serve.schema import ServeDeploySchema

    from serve.app import ServeArgs

    if not isinstance(config, dict) or not config.get("applications"):
        raise UserError(f"{where}: no applications (a Serve config has an `applications` list)")
    _unknown_keys(config, ServeDeploySchema, where)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise UserError(_field_errors(e, where)) from None
    for i, app in enumerate(config["applications"]):
        at = f"{where}: applications[{i}] ({app.get('name', '?')})"
        if app.get("import_path") != IMPORT_PATH:
            continue
        try:
            args = ServeArgs.model_validate(app.get("args") or {})
        except ValidationError as e:
            raise UserError(_field_errors(e, f"{at}.args")) from None
        if "://" not in args.registry:  # Serve builds the app elsewhere: no relative paths
            app["args"]["registry"] = str(Path(args.registry).expanduser().resolve())
        for d in app.get("deployments", []):
            name = str(d.get("name", ""))
            if name != "ingress" and not name.startswith("model-"):
                raise UserError(f"{at}.deployments: unknown deployment '{name}' (ingress, model-<version>)")
            if name.startswith("model-") and not args.canary:
                raise UserError(
                    f"{at}.deployments: '{name}' exists only during a canary release; "
                    "one version is served by the ingress itself (override `ingress`)"
                )
    return config


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no Serve config at {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
    return validate(config, str(path))


def config_for(
    tasks: list[str],
    registry: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    canary: dict[str, str] | None = None,
    canary_percent: float = 0,
    api_key_env: str | None = None,
) -> dict:
    """A Serve config for these tasks' production models (and canaries) in a registry."""
    apps = []
    for task in tasks:
        args: dict[str, Any] = {"task": task, "registry": registry}
        if api_key_env:
            args["api_key_env"] = api_key_env
        if canary and task in canary:
            args |= {"canary": canary[task], "canary_percent": canary_percent}
        apps.append({"name": task, "route_prefix": f"/{task}", "import_path": IMPORT_PATH, "args": args})
    return validate(
        {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": apps}
    )


def override(config: dict, registry: str | None, api_key_env: str | None = None) -> dict:
    """The config with every application's registry (a file written for a cluster, served from a
    local registry) and API key variable replaced where given."""
    for app in config["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            given = {"registry": registry, "api_key_env": api_key_env}
            app["args"] |= {k: v for k, v in given.items() if v}
    return validate(config)


# ------------------------------------------------------------------ talking to Serve


def _client(dashboard: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from jobs.submit import auth_headers

    url = dashboard if "://" in dashboard else f"http://{dashboard}"
    try:
        return ServeSubmissionClient(url, headers=auth_headers())
    except Exception as e:  # requests' and Ray's connection errors
        raise ConnectionError(f"no Ray dashboard at {url}: {str(e).splitlines()[0]}") from None


def dashboard_url() -> str:
    import ray._private.worker as worker

    return worker.get_dashboard_url()


def check_models(config: dict) -> None:
    """Fail here, in one line, when a registry version is missing, before Serve builds anything."""
    from serve.app import ServeArgs, key_digest, versions

    for app in config["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            try:
                args = ServeArgs.model_validate(app["args"])
                key_digest(args)  # an API key variable that is not set here
                versions(args)
            except (UserError, ValueError) as e:
                raise UserError(f"application {app['name']}: {e}") from None


def gpu_warning(config: dict) -> str | None:
    """A line when applications ask for GPUs the cluster has none of (yet): their replicas wait
    for an autoscaled GPU node, which never comes on a laptop."""
    import ray

    wanting = [a["name"] for a in config["applications"] if (a.get("args") or {}).get("model_gpus")]
    if wanting and not ray.cluster_resources().get("GPU"):
        return (
            f"warning: {', '.join(wanting)} ask for GPUs and this cluster has none now: their replicas "
            "wait for a GPU node (set args.model_gpus: 0 to serve on CPUs)"
        )
    return None


def deploy(config: dict, dashboard: str, timeout_s: float = DEPLOY_TIMEOUT_S, progress=print) -> dict:
    """PUT the config (every application in it; others on the cluster are removed, as with
    `serve deploy`) and wait until each application runs. Returns Serve's details."""
    client = _client(dashboard)
    client.deploy_applications(config)
    return wait(client, [a["name"] for a in config["applications"]], timeout_s, progress)


def wait(client, names: list[str], timeout_s: float, progress=print) -> dict:
    deadline, shown = time.monotonic() + timeout_s, {}
    while True:
        details = client.get_serve_details()
        apps = details.get("applications", {})
        status = {n: apps.get(n, {}).get("status", "NOT_STARTED") for n in names}
        for n, s in status.items():
            if shown.get(n) != s:
                progress(f"  {n}: {s.lower()}")
                shown[n] = s
        failed = [n for n, s in status.items() if s == "DEPLOY_FAILED"]
        if failed:
            message = apps[failed[0]].get("message", "").strip().splitlines()
            last = next((line for line in reversed(message) if line.strip()), "no message")
            raise UserError(f"application {failed[0]} failed to deploy: {last.strip()}")
        if all(s == "RUNNING" for s in status.values()):
            return details
        if time.monotonic() > deadline:
            raise UserError(f"applications not running after {timeout_s:.0f} s: {status}")
        time.sleep(1)


def deployed_config(details: dict) -> dict:
    """The config that produced what runs now (Serve keeps each application's)."""
    apps = [
        a["deployed_app_config"]
        for a in details.get("applications", {}).values()
        if a.get("deployed_app_config")
    ]
    http = details.get("http_options") or {}
    return {
        "proxy_location": details.get("proxy_location", "HeadOnly"),
        "http_options": {k: http[k] for k in ("host", "port") if k in http},
        "applications": apps,
    }


def reconfigure(dashboard: str, task: str, deployment: str, user_config: dict, progress=print) -> dict:
    """Change keys of one deployment's user_config in a running application (the others keep
    their values). The application's code version (import path, args) stays, so Serve calls
    reconfigure() on the running replicas instead of replacing them: no restart, no dropped
    request."""
    client = _client(dashboard)
    details = client.get_serve_details()
    config = deployed_config(details)
    app = next((a for a in config["applications"] if a["name"] == task), None)
    if app is None:
        running = ", ".join(a["name"] for a in config["applications"]) or "none"
        raise UserError(f"no {task} application runs on this cluster (running: {running})")
    deployments = details["applications"][task].get("deployments", {})
    if deployment not in deployments:
        raise UserError(
            f"the {task} application has no deployment {deployment} (it has {', '.join(deployments)})"
        )
    current = deployments[deployment].get("deployment_config", {}).get("user_config") or {}
    others = [d for d in app.get("deployments", []) if d.get("name") != deployment]
    app["deployments"] = [*others, {"name": deployment, "user_config": {**current, **user_config}}]
    client.deploy_applications(config)
    return wait(client, [task], DEPLOY_TIMEOUT_S, progress)


def set_canary(dashboard: str, task: str, percent: float, progress=print) -> dict:
    """Move the canary's share of a running application in place (0 rolls back, 100 promotes)."""
    if not 0 <= percent <= 100:
        raise UserError(f"canary share must be within 0-100, got {percent}")
    client = _client(dashboard)
    app = client.get_serve_details().get("applications", {}).get(task, {})
    if not (app.get("deployed_app_config") or {}).get("args", {}).get("canary"):
        raise UserError(f"the {task} application serves no canary (deploy it with --canary {task}=VERSION)")
    return reconfigure(dashboard, task, "ingress", {"canary_percent": percent}, progress)


def set_batching(dashboard: str, task: str, version: str, batching: dict, progress=print) -> dict:
    """Move a served version's @serve.batch settings in place: on its own deployment during a
    canary release, on the ingress that holds it otherwise."""
    from serve.app import Batching

    batching = Batching.model_validate(batching).model_dump()
    deployments = (
        _client(dashboard).get_serve_details().get("applications", {}).get(task, {}).get("deployments", {})
    )
    name = f"model-{version}" if f"model-{version}" in deployments else "ingress"
    return reconfigure(dashboard, task, name, batching, progress)


def urls(details: dict, host: str | None = None) -> dict[str, str]:
    http = details.get("http_options") or {}
    host = host or http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{host}:{http.get('port', 8000)}"
    return {
        name: f"{base}{app.get('route_prefix') or '/' + name}"
        for name, app in details.get("applications", {}).items()
    }


if __name__ == "__main__":
    import sys

    from jobs.cli import main

    main(["serve", *sys.argv[1:]])
