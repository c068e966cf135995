"""Bytes a recsys training step communicates, by table size: `python -m jobs.bench.comm --rows N ...`.

Two gloo ranks on this machine build the recsys model with a track table of N rows through the
worker's own build() (model, AdamW, DeepSpeed engine at the given ZeRO stage), take steps on
batches of the prepared tiny data, and DeepSpeed's comms logger counts the bytes of every
collective. A dense embedding gradient makes the bytes grow with the table's rows; the rows a
batch touches (history + candidate ids) are printed beside them.

    python -m jobs.bench.comm --data data/recsys-tiny --rows 100001 400001 --stage 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


def _rank(rank: int, port: int, args, out) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed.comm as ds_comm

    from jobs import tasks
    from jobs.config import load_recipe
    from jobs.worker import build

    torch.set_num_threads(1)
    task, cpu = tasks.get("recsys"), torch.device("cpu")
    for rows in args.rows:
        recipe = load_recipe(
            args.config,
            "tiny",
            [f"data.root={args.data}", f"model.num_tracks={rows}", f"train.zero_stage={args.stage}",
             "train.dtype=fp32", "model.flavour=full", "model.embedding_dim=128"],
        )  # fmt: skip
        torch.manual_seed(0)
        engine, _ = build(recipe, 2, "fp32", total_steps=100)
        ds_comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)
        batches = task.iter_split(args.data, "train", recipe.train.batch_size)
        touched = []
        for step, batch in zip(range(args.steps + 1), batches, strict=False):
            if step == 1:  # the first step also broadcasts the model: count from the second
                ds_comm.comms_logger.comms_dict.clear()
            loss = task.loss(recipe, engine(*task.inputs(batch, cpu, torch.float32)), batch, cpu)
            engine.backward(loss)
            engine.step()
            if step:
                ids = np.concatenate([np.ravel(batch["history_tracks"]), np.ravel(batch["candidate"])])
                touched.append(len(np.unique(ids[ids > 0])))
        sent = sum(
            size * record[0] for record_by_size in ds_comm.comms_logger.comms_dict.values()
            for size, record in record_by_size.items()
        )  # fmt: skip
        if rank == 0:
            out.put(
                {
                    "table_rows": rows,
                    "zero_stage": args.stage,
                    "bytes_per_step": sent / args.steps,
                    "rows_touched_per_step": float(np.mean(touched)),
                    "touched_bytes_per_step": float(np.mean(touched)) * 128 * 4,
                    "by_op": {op: sum(s * r[0] for s, r in v.items()) / args.steps
                              for op, v in ds_comm.comms_logger.comms_dict.items()},
                }
            )  # fmt: skip
        del engine
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared tiny recsys data (deepfleet prepare)")
    parser.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "../../configs/recsys.yaml")
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_001, 400_001])
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_rank, args=(port, args, out), nprocs=2, start_method="spawn")
    for _ in args.rows:
        r = out.get()
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
