"""The server a user would write without deepfleet: FastAPI + uvicorn + torch in one process,
the same exported model, request body, transform and answer as the served application, and
nothing else (no canary, drift, metrics, batching or replicas). The serving benchmark's baseline.

    python -m jobs.bench.bare_server MODEL_DIR --port 8100 [--threads 1]
"""

# no `from __future__ import annotations`: FastAPI must see the body type itself, not its name
import argparse


def app(model_dir: str, threads: int = 1):
    import torch
    from fastapi import FastAPI, HTTPException

    from jobs import tasks
    from jobs.export import load_exported
    from serve import codecs

    torch.set_num_threads(threads)
    model, card = load_exported(model_dir)
    task = tasks.get(card["task"])
    codec = codecs.get(card["task"], card, model_dir)
    serving = tasks.spec(card["task"]).api
    request_type, response_type = serving.request, serving.response
    api = FastAPI()

    @api.post("/predict", response_model=response_type)
    def predict(body: request_type):  # type: ignore[valid-type]  (a sync route: FastAPI's thread pool)
        request = body.model_dump()
        try:
            rows = codec.decode(request)
        except codecs.BadInput as e:
            raise HTTPException(422, str(e)) from None
        with torch.inference_mode():
            output = model(*task.inputs(rows, torch.device("cpu"), torch.float32))
        return {"version": "bare", **codec.encode(output, rows, request)}

    return api


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the served replica's CPUs)")
    a = p.parse_args(argv)
    uvicorn.run(app(a.model_dir, a.threads), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
