"""Check cluster definitions offline: `python -m cluster.validate [FILE ...]` (default: all of cluster/).

- Ray cluster-launcher YAML against the JSON schema inside the ray package
  (`ray/autoscaler/ray-schema.json`), plus what a schema cannot say (the head type exists, worker
  bounds are ordered).
- KubeRay manifests (`ray.io/v1` RayCluster, RayJob, RayService) and the PersistentVolumeClaim beside
  them: API version, kind and required fields; with the KubeRay CRDs in `../shared/kuberay/` (or
  $DEEPFLEET_KUBERAY_CRDS), their OpenAPI schemas too, unknown fields rejected as
  `kubectl apply --validate=strict` does. Every job entrypoint must name a deepfleet command whose
  arguments parse and whose recipe loads.
- The Dockerfile: based on Ray's GPU image at the installed Ray version, installs deepfleet.

Every problem names the file and the field: `cluster/aws.yaml: available_node_types.gpu-train.resources.GPU: ...`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = Path(os.environ.get("DEEPFLEET_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay")
KUBERAY_API = "ray.io/v1"
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def field(parts) -> str:
    """["spec", "workerGroupSpecs", 0, "maxReplicas"] -> "spec.workerGroupSpecs[0].maxReplicas"."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_problems(schema: dict, doc, prefix: tuple = ()) -> list[tuple[str, str]]:
    """(field, message) for every schema violation; a missing or unknown key is named as the field."""
    import jsonschema

    out = []
    for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
        path = (*prefix, *e.absolute_path)
        if e.validator == "required" and isinstance(e.instance, dict):
            out += [
                (field((*path, k)), "required field missing")
                for k in e.validator_value
                if k not in e.instance
            ]
        elif e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known, patterns = e.schema.get("properties", {}), e.schema.get("patternProperties", {})
            for k in e.instance:
                if k not in known and not any(re.search(p, k) for p in patterns):
                    out.append((field((*path, k)), "unknown field"))
        else:
            out.append((field(path), e.message))
    return sorted(set(out))


# -- Ray cluster launcher -------------------------------------------------------------------------


@functools.cache
def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # the file only: importing ray takes seconds
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def launcher_problems(doc: dict) -> list[tuple[str, str]]:
    out = schema_problems(ray_schema(), doc)
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    if types and head not in types:
        out.append(("head_node_type", f"{head!r} is not one of available_node_types ({', '.join(types)})"))
    for name, t in types.items():
        if isinstance(t, dict) and t.get("min_workers", 0) > t.get("max_workers", t.get("min_workers", 0)):
            out.append((f"available_node_types.{name}.min_workers", "larger than its max_workers"))
    mins = sum(t.get("min_workers", 0) for n, t in types.items() if isinstance(t, dict) and n != head)
    if "max_workers" in doc and mins > doc["max_workers"]:
        out.append(("max_workers", f"{doc['max_workers']} is below the node types' min_workers ({mins})"))
    return out


# -- Kubernetes / KubeRay -------------------------------------------------------------------------


def _closed(schema):
    """kubectl's strict validation: an object schema with properties takes no other keys."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict | None:
    """The openAPIV3Schema of the KubeRay CRD for kind at the version of api_version; None without CRDs."""
    path = CRD_DIR / f"ray.io_{KUBERAY_KINDS[kind]}.yaml"
    if not path.is_file():
        return None
    crd = yaml.load(path.read_text(), Loader=_Loader)
    wanted = api_version.split("/")[-1]
    for v in crd["spec"]["versions"]:
        if v["name"] == wanted:
            return _closed(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    return None


def _get(doc, *keys):
    for k in keys:
        if isinstance(k, int):
            doc = doc[k] if isinstance(doc, list) and len(doc) > k else None
        else:
            doc = doc.get(k) if isinstance(doc, dict) else None
    return doc


def _pod_problems(template, prefix: tuple) -> list[tuple[str, str]]:
    containers = _get(template, "spec", "containers")
    if not isinstance(containers, list) or not containers:
        return [(field((*prefix, "spec", "containers")), "required: at least one container")]
    return [
        (field((*prefix, "spec", "containers", i, "image")), "required: the container's image")
        for i, c in enumerate(containers)
        if not _get(c, "image")
    ]


def cluster_spec_problems(spec, prefix: tuple) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return [(field(prefix), "required: the Ray cluster's spec")]
    head = _get(spec, "headGroupSpec", "template")
    if head is None:
        return [(field((*prefix, "headGroupSpec", "template")), "required field missing")]
    out = _pod_problems(head, (*prefix, "headGroupSpec", "template"))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = (*prefix, "workerGroupSpecs", i)
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if _get(group, key) is None:
                out.append((field((*where, key)), "required field missing"))
        lo, hi = _get(group, "minReplicas"), _get(group, "maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int):
            if lo > hi:
                out.append((field((*where, "minReplicas")), f"{lo} is above maxReplicas {hi}"))
            n = _get(group, "replicas")
            if isinstance(n, int) and not lo <= n <= hi:
                out.append((field((*where, "replicas")), f"{n} is outside minReplicas..maxReplicas"))
        if _get(group, "template") is not None:
            out += _pod_problems(group["template"], (*where, "template"))
    return out


def entrypoint_problem(entrypoint: str, cwd: Path = ROOT) -> str | None:
    """Why `python -m jobs.<command> ARGS` would not start (None when it would): the module, the
    command's options and the recipe they name are all checked, nothing runs."""
    from typer.main import get_command

    from jobs.cli import app
    from jobs.config import recipe_from_options

    argv = shlex.split(entrypoint)
    if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2].startswith("jobs."):
        module, args = argv[2], argv[3:]
        if importlib.util.find_spec(module) is None:
            return f"module {module} does not exist"
        name = module.removeprefix("jobs.")
    elif argv[:1] == ["deepfleet"] and len(argv) > 1:
        name, args = argv[1], argv[2:]
    else:
        return (
            f"not a deepfleet command (python -m jobs.<command> ... or deepfleet <command> ...): {entrypoint}"
        )
    command = get_command(app).commands.get(name)
    if command is None:
        return f"deepfleet has no command {name!r}"
    try:
        params = command.make_context(name, list(args)).params
    except Exception as e:  # typer's (vendored) click usage errors
        return f"{name}: {getattr(e, 'format_message', e.__str__)()}"
    if params.get("config") is not None:
        config = Path(params["config"])
        config = config if config.is_absolute() else cwd / config
        try:
            recipe_from_options(
                config,
                params.get("profile"),
                params.get("set_"),
                params.get("output_dir"),
                params.get("name"),
            )
        except Exception as e:  # ConfigError, FileNotFoundError: the message names the key or file
            return f"{name}: {str(e).splitlines()[0]}"
    return None


def serve_config_problem(config: dict) -> str | None:
    """What `deepfleet serve --config` would refuse in a RayService's Serve config (Serve itself
    ignores unknown keys), e.g. `applications[0] (retinopathy).args.batching.max_batch_sise: ...`."""
    from jobs.errors import UserError
    from jobs.serve import validate

    try:
        validate(config, "")
    except UserError as e:
        return str(e).lstrip(":. ")
    return None


def manifest_problems(doc: dict) -> list[tuple[str, str]]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    out = []
    name = _get(doc, "metadata", "name")
    if not isinstance(name, str) or not DNS_NAME.match(name):
        out.append(("metadata.name", f"required: a lowercase DNS name, not {name!r}"))
    if kind == "PersistentVolumeClaim":
        if api != "v1":
            out.append(("apiVersion", f"{api!r}: a PersistentVolumeClaim is v1"))
        if not _get(doc, "spec", "accessModes"):
            out.append(("spec.accessModes", "required field missing"))
        if not _get(doc, "spec", "resources", "requests", "storage"):
            out.append(("spec.resources.requests.storage", "required field missing"))
        return out
    if kind not in KUBERAY_KINDS:
        return [
            *out,
            ("kind", f"{kind!r} is not one of {', '.join(KUBERAY_KINDS)} (or PersistentVolumeClaim)"),
        ]
    if api != KUBERAY_API:
        return [*out, ("apiVersion", f"{api!r}: KubeRay's API is {KUBERAY_API}")]
    spec = doc.get("spec")
    if kind == "RayCluster":
        out += cluster_spec_problems(spec, ("spec",))
    elif kind == "RayJob":
        entrypoint = _get(spec, "entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            out.append(("spec.entrypoint", "required: the command the job runs"))
        elif problem := entrypoint_problem(entrypoint):
            out.append(("spec.entrypoint", problem))
        if _get(spec, "clusterSelector") is None:
            out += cluster_spec_problems(_get(spec, "rayClusterSpec"), ("spec", "rayClusterSpec"))
    else:  # RayService
        out += cluster_spec_problems(_get(spec, "rayClusterConfig"), ("spec", "rayClusterConfig"))
        serve = _get(spec, "serveConfigV2")
        if not isinstance(serve, str) or not isinstance(yaml.safe_load(serve), dict):
            out.append(("spec.serveConfigV2", "required: Ray Serve's config as a YAML string"))
        elif problem := serve_config_problem(yaml.safe_load(serve)):
            out.append(("spec.serveConfigV2", problem))
    schema = crd_schema(kind, api)
    if schema is not None:
        named = {f for f, _ in out}
        out += [(f, f"{m} (KubeRay CRD)") for f, m in schema_problems(schema, doc) if f not in named]
    return out


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_problems(text: str) -> list[tuple[str, str]]:
    lines = re.sub(r"\\\n", " ", text).splitlines()  # join continuation lines
    images = [ln.split()[1] for ln in lines if ln.strip().upper().startswith("FROM ") and len(ln.split()) > 1]
    ray = ".".join(version("ray").split(".")[:2])
    out = []
    if not images:
        out.append(("FROM", "required: a base image"))
    elif not re.fullmatch(rf"rayproject/ray:{re.escape(ray)}\.\d+(-py\d+)?-(gpu|cu\d+)", images[0]):
        out.append(
            ("FROM", f"{images[0]}: must be Ray's GPU image at Ray {ray} (rayproject/ray:{ray}.x-pyNNN-gpu)")
        )
    if not any(
        re.search(r"\bpip install\b.*(\s\.(\s|$)|-e \.)", ln) for ln in lines if ln.strip().startswith("RUN")
    ):
        out.append(("RUN", "no `pip install .` of deepfleet"))
    return out


# -- files ----------------------------------------------------------------------------------------


def problems(path: str | Path) -> list[str]:
    """Every problem of one file, as `FILE: FIELD: MESSAGE`; empty when it validates."""
    path = Path(path)
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    if path.name.startswith("Dockerfile") and path.suffix != ".dockerignore":
        found = dockerfile_problems(path.read_text())
    else:
        try:
            docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
        except yaml.YAMLError as e:
            return [f"{shown}: not YAML: {str(e).splitlines()[0]}"]
        found = []
        for i, doc in enumerate(docs):
            where = f"[document {i}] " if len(docs) > 1 else ""
            if not isinstance(doc, dict):
                part = [("(top level)", "not a mapping")]
            elif "apiVersion" in doc or "kind" in doc:
                part = manifest_problems(doc)
            elif "cluster_name" in doc or "provider" in doc:
                part = launcher_problems(doc)
            else:
                part = [("(top level)", "neither a Ray cluster-launcher file nor a Kubernetes manifest")]
            found += [(where + f, m) for f, m in part]
    return [f"{shown}: {f}: {m}" for f, m in found]


def definition_files(folder: Path = CLUSTER) -> list[Path]:
    """The cluster definitions in folder: YAML files and Dockerfiles (not Python, not ignore files)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in (".yaml", ".yml") or p.name == "Dockerfile")
    )


def main(argv: list[str] | None = None) -> int:
    files = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or definition_files()
    bad = 0
    for f in files:
        found = problems(f) if f.is_file() else [f"{f}: no such file"]
        bad += bool(found)
        print("\n".join(found) if found else f"ok {f}", file=sys.stderr if found else sys.stdout)
    if not CRD_DIR.is_dir():
        print(
            f"note: no KubeRay CRDs at {CRD_DIR}: manifests were checked without their schemas",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
