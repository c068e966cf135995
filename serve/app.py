"""The typed application builder: `import_path: serve.app:build` with ServeArgs as `args`.

serve run serve.app:build task=retinopathy registry=/shared/registry
serve deploy configs/serve/deepfleet.yaml        # the three tasks, see that file
deepfleet serve                                   # the same, on an embedded cluster by default
"""

import hashlib
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve import Application


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")  # Serve itself would ignore a misspelt key


class Batching(Args):
    """@serve.batch of the model replicas (user_config: change it without a restart)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests per forward pass at most.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a forward pass waits to fill its batch."
    )


class Autoscaling(Args):
    """Replicas per model version, scaled by Serve on ongoing requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica that Serve aims for (about one batch)."
    )

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class Drift(Args):
    threshold: float = Field(
        0.2, gt=0, description="PSI above which a version's live traffic counts as drifted (alert line)."
    )
    window: int = Field(500, ge=50, description="Most recent rows the score is computed over.")


class ServeArgs(Args):
    """One task's application: which registry versions to serve and how."""

    task: str = Field(description="A registered task (jobs.tasks: deepfleet's own and installed plugins').")
    registry: str = Field("registry", description="Registry folder or URI (s3://, gs://, ...).")
    version: str | None = Field(None, description="Stable version (default: the newest in `stage`).")
    stage: str = Field("production", description="Stage the stable version is taken from.")
    canary: str | None = Field(
        None, description="A second version served beside the stable one (its share: canary_percent)."
    )
    canary_percent: float = Field(
        0, ge=0, le=100, description="Starting share of the canary; move it with `deepfleet canary`."
    )
    batching: Batching = Batching()
    autoscaling: Autoscaling = Autoscaling()
    max_ongoing_requests: int = Field(
        64, ge=1, description="Back-pressure: requests a replica holds at most."
    )
    model_cpus: float = Field(
        0.5, gt=0, description="CPUs of a model replica (torch threads: rounded, >= 1)."
    )
    model_gpus: float = Field(0, ge=0)
    ingress_cpus: float = Field(
        0.25, gt=0, description="CPUs of the ingress in front of a canary release's model deployments."
    )
    max_body_bytes: int = Field(8 << 20, ge=1024, description="Larger request bodies get 413.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="A prediction not answered within this many seconds gets 504."
    )
    drift: Drift = Drift()
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable (of the process that builds the application) "
        "holding an API key: /predict and /drift then need `Authorization: Bearer <key>` (401 "
        "without); /health stays open. The key itself is never in the config.",
    )

    @field_validator("task")
    @classmethod
    def _registered(cls, task: str) -> str:
        from jobs import tasks

        tasks.spec(task)  # ValueError naming the registered tasks
        return task

    @model_validator(mode="after")
    def _canary(self):
        if self.canary_percent and not self.canary:
            raise ValueError("canary_percent is set but no canary version is named")
        return self


def versions(args: ServeArgs) -> list[dict]:
    """Registry entries of the stable version (and the canary): the check that they exist."""
    from jobs.registry import Registry

    registry = Registry(args.registry)
    stable = registry.resolve(args.task, args.version, args.stage)
    out = [stable]
    if args.canary:
        if args.canary == stable["version"]:
            raise ValueError(f"canary {args.canary} is the stable version itself")
        out.append(registry.entry(args.task, args.canary))
    return out


def key_digest(args: ServeArgs) -> str | None:
    """The sha256 of the API key named by `api_key_env` (None without one): the ingress compares
    digests, so the key itself reaches neither Serve's config nor the replicas."""
    if args.api_key_env is None:
        return None
    key = os.environ.get(args.api_key_env, "")
    if not key.strip():
        raise ValueError(f"api_key_env names {args.api_key_env}, which is not set (or empty) here")
    return hashlib.sha256(key.strip().encode()).hexdigest()


def build(args: ServeArgs) -> Application:
    """One version: a single deployment, the ingress holding the model (one hop per request,
    scaled by `autoscaling`, batching in its user_config). With a canary: the ingress (one
    replica: one drift window per version) in front of a deployment per version."""
    from serve.deployments import Model, ingress

    entries = versions(args)
    references = {e["version"]: e.get("reference") for e in entries}
    model_args = {
        e["version"]: {
            "task": args.task,
            "registry": args.registry,
            "version": e["version"],
            "cpus": args.model_cpus,
            "gpus": args.model_gpus,
        }
        for e in entries
    }
    front = serve.deployment(ingress(args.task, args.max_body_bytes, key_digest(args))).options(
        name="ingress"
    )
    replicas = {
        "max_ongoing_requests": args.max_ongoing_requests,
        "autoscaling_config": args.autoscaling.model_dump(),
        "ray_actor_options": {"num_cpus": args.model_cpus, "num_gpus": args.model_gpus},
    }
    if not args.canary:
        front = front.options(**replicas, user_config={"canary_percent": 0, **args.batching.model_dump()})
        return front.bind(args.task, model_args, references, args.drift.model_dump(), args.request_timeout_s)
    model = serve.deployment(Model).options(**replicas, user_config=args.batching.model_dump())
    models = {v: model.options(name=f"model-{v}").bind(**kwargs) for v, kwargs in model_args.items()}
    front = front.options(
        num_replicas=1,  # one drift window per version: scale the models, not the front
        max_ongoing_requests=4 * args.max_ongoing_requests,
        user_config={"canary_percent": args.canary_percent},
        ray_actor_options={"num_cpus": args.ingress_cpus},
    )
    return front.bind(args.task, models, references, args.drift.model_dump(), args.request_timeout_s)
