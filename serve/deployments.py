"""The deployments of every task's application.

One version (production):   HTTP -> ingress holding the model itself (one hop)
With a canary:              HTTP -> ingress (canary split) -> model-<stable> | model-<canary>

The ingress is FastAPI: validation, body limit, canary split, drift, metrics. A model
(`Model`: decode with the training transform, @serve.batch forward, encode) lives in the
ingress replica when it is the only version, so a request costs one hop, as in a bare server
(a second deployment adds a hop: docs/benchmarks.md); during a canary release each
version is a deployment of its own, scaled on its own, and both pay the same hop. One `Model`
class serves every task and version; one ingress per task, made by `ingress()`, differs only
in its typed request and response bodies. Canary weights and batch sizes are user_config:
moving them reconfigures the running replicas (no restart, no dropped request).
"""

import asyncio
import hashlib
import hmac
import inspect
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from serve import codecs

logger = logging.getLogger("ray.serve")


class Model:
    """One registry version of a task's model behind @serve.batch."""

    def __init__(self, task: str, registry: str, version: str, cpus: float = 1.0, gpus: float = 0):
        from jobs import tasks
        from jobs.export import load_exported
        from jobs.registry import Registry

        torch.set_num_threads(max(1, round(cpus)))
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        self.version = version
        model_dir = Registry(registry).fetch(task, version)
        self.model, self.card = load_exported(model_dir)
        self.model.to(self.device)
        self.task = tasks.get(task)
        self.codec = codecs.get(task, self.card, model_dir)
        self.request_type = tasks.spec(task).api.request
        self.batch_sizes = Histogram(
            "deepfleet_batch_size",
            description="Requests per model forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("task", "version"),
        )
        self.batch_sizes.set_default_tags({"task": task, "version": version})
        # decoding (base64, PNG/JPEG) runs beside the event loop, which keeps answering /health
        # and batching; a fixed pool bounds how many decode at once
        self.decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
        self.healthy_at = -1e9  # when the example request last predicted finite values

    def reconfigure(self, config: dict) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; applied to running replicas."""
        self.forward.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.forward.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    async def call(self, method: str, *args):
        """The ingress's way to reach a model it holds itself: no hop (a handle's twin)."""
        result = getattr(self, method)(*args)
        return await result if inspect.isawaitable(result) else result

    def _run(self, rows: list[dict[str, np.ndarray]]) -> list[tuple]:
        """Model outputs and drift features for several requests' rows in one forward pass."""
        sizes = np.cumsum([0] + [len(next(iter(r.values()))) for r in rows])
        batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        with torch.inference_mode():
            inputs = self.task.inputs(batch, self.device, torch.float32)
            output = self.model(*inputs)
            features = self.task.drift_features(inputs, output)
            output = codecs.tree_map(lambda t: t.float().cpu(), output)
        return [
            (codecs.tree_map(lambda t: t[a:b], output), {k: v[a:b].tolist() for k, v in features.items()})  # noqa: B023
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        ]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def forward(self, rows: list[dict[str, np.ndarray]]) -> list[tuple]:
        self.batch_sizes.observe(len(rows))
        return self._run(rows)

    async def predict(self, request: dict) -> dict:
        """{"answer": ..., "drift": {feature: values}} or {"error": why} for a bad request."""
        try:
            rows = await asyncio.get_running_loop().run_in_executor(self.decoders, self.codec.decode, request)
        except codecs.BadInput as e:
            return {"error": str(e)}
        output, drift = await self.forward(rows)
        if not _finite(output):  # an answer of NaN or inf is no answer (and JSON cannot carry it)
            return {"error": "the model's answer to this input is not finite: check the input's values"}
        return {"answer": self.codec.encode(output, rows, request), "drift": drift}

    def check_health(self) -> None:
        """Serve restarts a replica whose model cannot predict its example request."""
        request = self.request_type.model_validate(self.codec.example()).model_dump()
        rows = self.codec.decode(request)
        output, _ = self._run([rows])[0]
        if not _finite(output):
            raise RuntimeError(f"model {self.version} predicts non-finite values")
        self.healthy_at = time.monotonic()

    def info(self) -> dict:
        """What /health shows: from the last check (Serve runs it every few seconds), so a
        health request costs no forward pass unless that check is old."""
        if time.monotonic() - self.healthy_at > HEALTH_MAX_AGE_S:
            self.check_health()
        return {
            "version": self.version,
            "model": f"{self.card['model']['name']}/{self.card['model']['flavour']}",
            "parameters": self.card["model"]["parameters"],
            "created": self.card.get("created"),
        }


DECODE_THREADS = 2
HEALTH_MAX_AGE_S = 30.0  # Serve's own check runs every 10 s by default


def _finite(output) -> bool:
    values = output.values() if isinstance(output, dict) else [output]
    return all(bool(torch.isfinite(v).all()) for v in values)


class Remote:
    """A model version served by a deployment of its own (the canary release's layout)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def call(self, method: str, *args):
        return await getattr(self.handle, method).remote(*args)


class Ingress:
    """Routes a validated request to the stable or the canary model version and keeps, per
    version, request metrics and a drift window of live inputs and predictions.

    `models` maps each version to a handle of its deployment, or to the keyword arguments of a
    `Model` that this replica builds and holds itself (the one-version layout)."""

    def __init__(
        self,
        task: str,
        models: dict[str, DeploymentHandle | dict],
        references: dict[str, dict | None],
        drift: dict,
        request_timeout_s: float = 30.0,
    ):
        from jobs.drift import DriftWindow

        self.task = task
        self.request_timeout_s = request_timeout_s
        self.models = {v: Model(**m) if isinstance(m, dict) else Remote(m) for v, m in models.items()}
        self.held = [m for m in self.models.values() if isinstance(m, Model)]
        self.stable, *canary = list(models)
        self.canary = canary[0] if canary else None
        self.percent = 0.0
        self.drift_threshold = drift["threshold"]
        self.windows = {
            v: DriftWindow(ref, window=drift["window"], threshold=drift["threshold"]) if ref else None
            for v, ref in references.items()
        }
        self.alerted: dict[str, float] = {}  # when each version last logged an alert
        self.scored: dict[str, float] = {}  # when each version's window was last scored
        tags = ("task", "version")
        self.requests = Counter(
            "deepfleet_requests",
            description="Predictions answered, by version and status (ok, client_error, error).",
            tag_keys=(*tags, "status"),
        )
        self.latency = Histogram(
            "deepfleet_latency_ms",
            description="Time from the ingress to the model's answer, ms.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=tags,
        )
        self.drift_score = Gauge(
            "deepfleet_drift_score", description="Population stability index of live traffic.", tag_keys=tags
        )

    def reconfigure(self, config: dict) -> None:
        """user_config {"canary_percent": p}: the share of requests the canary version answers;
        with the model held here, its batching too ({max_batch_size, batch_wait_timeout_s})."""
        percent = float(config.get("canary_percent", 0))
        if not 0 <= percent <= 100:
            raise ValueError(f"canary_percent must be within 0-100, got {percent}")
        if percent and self.canary is None:
            raise ValueError("canary_percent is set but the application serves no canary version")
        self.percent = percent
        for model in self.held:
            model.reconfigure(config)

    def check_health(self) -> None:
        """Serve restarts a replica whose model (held here) cannot predict its example request."""
        for model in self.held:
            model.check_health()

    def _pick(self) -> str:
        if self.canary and random.uniform(0, 100) < self.percent:
            return self.canary
        return self.stable

    async def route(self, body, response: Response) -> dict:
        version = self._pick()
        tags = {"task": self.task, "version": version}
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self.models[version].call("predict", body.model_dump()), self.request_timeout_s
            )
        except TimeoutError:
            self.requests.inc(tags={**tags, "status": "error"})
            raise HTTPException(
                504, f"no answer within {self.request_timeout_s:g} s (serve.request_timeout_s)"
            ) from None
        except Exception:
            self.requests.inc(tags={**tags, "status": "error"})
            raise
        if "error" in result:
            self.requests.inc(tags={**tags, "status": "client_error"})
            raise HTTPException(status_code=422, detail=result["error"])
        self.latency.observe((time.perf_counter() - start) * 1000, tags=tags)
        self.requests.inc(tags={**tags, "status": "ok"})
        self._observe(version, result["drift"])
        response.headers["X-Model-Version"] = version
        return {"version": version, **result["answer"]}

    def _observe(self, version: str, values: dict) -> None:
        window = self.windows.get(version)
        if window is None:
            return
        window.observe({k: np.asarray(v, dtype=np.float64) for k, v in values.items()})
        # scoring the window costs more than observing it: the gauge and the alert look once a second
        if time.monotonic() - self.scored.get(version, -1e9) < 1:
            return
        self.scored[version] = time.monotonic()
        report = window.report()
        if report["score"] is None:
            return
        self.drift_score.set(report["score"], tags={"task": self.task, "version": version})
        # one alert line a minute while the score stays above the threshold
        if report["drifted"] and time.monotonic() - self.alerted.get(version, -1e9) > 60:
            self.alerted[version] = time.monotonic()
            worst = max(report["features"], key=report["features"].get)
            logger.warning(
                f"DRIFT ALERT {self.task} {version}: PSI {report['score']:.3f} above "
                f"{self.drift_threshold} over the last {report['rows']} rows (worst feature: {worst})"
            )

    async def health_report(self) -> dict:
        versions = {}
        for v, model in self.models.items():
            try:
                versions[v] = await model.call("info")
            except Exception as e:  # a replica that cannot predict
                raise HTTPException(503, f"model {v} cannot predict: {str(e).splitlines()[0]}") from None
        shares = {self.stable: 100 - self.percent, **({self.canary: self.percent} if self.canary else {})}
        return {
            "status": "ok",
            "task": self.task,
            "versions": {v: {**info, "traffic_percent": shares[v]} for v, info in versions.items()},
        }

    def drift_report(self) -> dict:
        return {
            "task": self.task,
            "threshold": self.drift_threshold,
            "versions": {
                v: w.report() if w else {"score": None, "why": "the model card holds no reference statistics"}
                for v, w in self.windows.items()
            },
        }


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 once that many bytes have arrived,
    whatever Content-Length claims and whether or not it is sent (chunked bodies are counted as
    they stream); a Content-Length that is not a number gets 400. What passes is handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.strip().isdigit():
            return await _reply(scope, receive, send, 400, "Content-Length is not a number")
        if declared is not None and int(declared) > self.max_bytes:
            return await _reply(scope, receive, send, 413, self._over(int(declared)))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _reply(scope, receive, send, 413, self._over(size, sent=True))
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _over(self, size: int, sent: bool = False) -> str:
        what = f"request body of {size}+ bytes sent so far" if sent else f"request body of {size} bytes"
        return f"{what} is over the limit of {self.max_bytes} (serve.max_body_bytes)"


class ApiKey:
    """ASGI middleware: every request but `/health` carries `Authorization: Bearer <key>` whose
    sha256 is `digest` (compared in constant time), else 401 before its body is read."""

    def __init__(self, app, digest: str):
        self.app, self.digest = app, digest

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/").endswith("/health"):
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.digest):
            detail = "a valid API key is required: Authorization: Bearer <key> (serve.api_key_env)"
            response = JSONResponse(
                {"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _reply(scope, receive, send, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def api(task: str, max_body_bytes: int, key_digest: str | None = None) -> FastAPI:
    """The task's FastAPI app: OpenAPI at /<task>/docs; bodies over the limit get 413; with an
    API key's digest, requests without the key get 401 (checked first: before the body)."""
    app = FastAPI(
        title=f"deepfleet {task}",
        description=f"Predictions of the {task} model in production (and its canary).",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # FastAPI's default echoes each bad input back (a whole base64 image); say where and what
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return JSONResponse({"detail": f"{where}: {first['msg']}", "errors": errors}, status_code=422)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if key_digest:
        app.add_middleware(ApiKey, digest=key_digest)  # added last: runs first
    return app


def ingress(task: str, max_body_bytes: int, key_digest: str | None = None):
    """The task's ingress deployment class: `Ingress` with typed routes for its bodies."""
    from jobs import tasks

    app = api(task, max_body_bytes, key_digest)
    serving = tasks.spec(task).api
    request_type, response_type = serving.request, serving.response

    class TaskIngress(Ingress):
        @app.post("/predict", response_model=response_type, summary=f"{task} prediction")
        async def predict(self, body: request_type, response: Response):  # type: ignore[valid-type]
            return await self.route(body, response)

        @app.get("/health", summary="Every served version predicts its example request")
        async def health(self):
            return await self.health_report()

        @app.get("/drift", summary="Population stability index of live traffic, per version")
        def drift(self):
            return self.drift_report()

    TaskIngress.__name__ = f"{task.capitalize()}Ingress"  # (__qualname__ ties the routes to the class)
    return serve.ingress(app)(TaskIngress)
