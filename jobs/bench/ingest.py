"""`deepfleet bench --section ingest`: rows/s and MB/s of one task's training split, read from the
same Parquet shards by

    pyarrow     data_loaders.shards.iter_tables: plain pyarrow batches, one thread of Python (the
                ceiling of reading; decoded: each batch decoded here, from the format the task's
                pipeline decodes: numpy, or Arrow for recsys)
    dataloader  a torch IterableDataset over the same files (units of one Parquet row group,
                dealt to the workers), in a torch DataLoader with num_workers 0 and num_workers =
                the machine's cores (persistent forkserver workers; batches come back through
                the DataLoader's own collation)
    ray         our Ray Data pipeline: undecoded, ray.data.read_parquet of the shards with the
                task's columns; decoded, the task's datasets(recipe, manifest)["train"] (what a
                training run reads: decoding, augmentation, recsys's random shard order; recsys also
                without it), iterated as the worker iterates an epoch (jobs.worker.train_batches:
                numpy, drop_last, prefetch_batches=2, recsys's shuffled windows)

each without and with decoding (the task's decode_batch with the training split's arguments), at
the recipe's batch size. A timed call is one pass over the split's files listed EPOCHS_PER_PASS
times (4 quick, 2 full): one pipeline start-up per pass, as a training epoch pays one;
jobs.bench.median_rate gives rows/s of whole passes, start-up included; the median time to a
pass's first batch and the rows/s after it (start-up left out) are reported beside it. The
DataLoader's workers persist across passes.
MB/s counts Parquet bytes on disk (the split's file bytes per row). Training consumption is the
plain PyTorch step of jobs.bench.train_step (samples/s on the recipe's thread count), measured here.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from jobs.bench import median_rate, target
from jobs.bench import train_step as ts

RAY_VS_DATALOADER, INGEST_VS_TRAINING = 0.8, 2.0
# epochs' worth of the split in one timed pass (quick, full): a pass's start-up is paid once per pass
EPOCHS_PER_PASS = {True: 4, False: 2}


# ------------------------------------------------------------------ what a task reads


def _columns_and_decode(recipe, manifest: dict) -> tuple[list[str], Callable[[dict], dict], bool]:
    """The stored columns the task's Ray pipeline reads, its decode transform with the arguments
    the training split's map_batches gives it (a picklable callable), and whether that transform
    takes Arrow batches (recsys) rather than numpy ones."""
    d = recipe.data
    if recipe.task == "retinopathy":
        from data_loaders import retinopathy as data

        # the loader's own column list (select_columns of read_split), not a copy of it
        return (
            data._READ_COLUMNS,
            functools.partial(data.decode_batch, image_size=d.image_size, augment=d.augment),
            False,
        )
    if recipe.task == "autonomous":
        from data_loaders import autonomous as data

        return (
            data._READ_COLUMNS,
            functools.partial(
                data.decode_batch,
                image_size=(d.image_height, d.image_width),
                max_boxes=d.max_boxes,
                num_lanes=d.num_lanes,
                lane_points=d.lane_points,
                augment=d.augment,
            ),
            False,
        )
    from data_loaders import recsys as data

    meta = manifest["meta"]
    return (
        data.READ_COLUMNS,
        functools.partial(
            data.decode_batch,
            root=os.path.abspath(d.root),
            history_len=meta["history_len"],
            event_features=meta["event_features"],
        ),
        True,
    )


def as_numpy(table) -> dict:
    """A pyarrow Table or RecordBatch as Ray Data's numpy batch format has it (a column per key;
    binary and list columns as object arrays)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _rows(batch) -> int:
    if hasattr(batch, "num_rows"):
        return batch.num_rows
    return len(next(iter(batch.values())))


class ParquetBatches(IterableDataset):
    """A torch IterableDataset over Parquet files: units of one row group, dealt round-robin to
    the DataLoader's workers; numpy batches of `batch_size` rows within a unit, decoded (from
    Arrow where `arrow`) or not."""

    def __init__(
        self,
        paths: list[str],
        columns: list[str],
        batch_size: int,
        decode: Callable | None = None,
        arrow: bool = False,
    ):
        import pyarrow.parquet as pq

        self.paths, self.columns, self.batch_size, self.decode = paths, columns, batch_size, decode
        self.arrow = arrow
        self.units = [(p, g) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)]

    def __iter__(self) -> Iterator[dict]:
        import pyarrow.parquet as pq

        info = get_worker_info()
        mine = self.units[info.id :: info.num_workers] if info else self.units
        for path, group in mine:
            f = pq.ParquetFile(path)
            for rb in f.iter_batches(batch_size=self.batch_size, row_groups=[group], columns=self.columns):
                if self.decode:
                    yield self.decode(rb if self.arrow else as_numpy(rb))
                else:
                    yield as_numpy(rb)


# ------------------------------------------------------------------ timing


def timed_passes(make: Callable[[], Iterator], repeats: int, warmup: int = 1) -> dict:
    """Rows/s of whole passes (jobs.bench.median_rate; start-up included), the median time to a
    pass's first batch (its start-up), and the median rows/s after the first batch (steady)."""
    first: list[float] = []
    steady: list[float] = []

    def one_pass() -> int:
        tic, rows = time.perf_counter(), 0
        for batch in make():
            if not rows:
                first.append(time.perf_counter() - tic)
            rows += _rows(batch)
        steady.append(rows / max(time.perf_counter() - tic - first[-1], 1e-9))
        return rows

    rate = median_rate(one_pass, repeats=repeats, warmup=warmup)
    return {
        "rows_per_s": rate["median"],
        "repeats": rate["repeats"],
        "first_batch_s": statistics.median(first[warmup:]),
        "steady_rows_per_s": statistics.median(steady[warmup:]),
    }


def repeated(manifest: dict, times: int) -> dict:
    """The manifest with its train split's shards listed `times` times: one pass, `times` epochs."""
    out = copy.deepcopy(manifest)
    train = out["splits"]["train"]
    train["shards"], train["rows"] = train["shards"] * times, train["rows"] * times
    return out


def measure_task(recipe, quick: bool, progress: Callable[[str], None]) -> dict:
    import ray.data
    from torch.utils.data import DataLoader

    from data_loaders.shards import iter_tables, readable_paths
    from jobs import tasks
    from jobs.worker import train_batches

    task = tasks.get(recipe.task)
    manifest = task.prepare(recipe)
    epochs = EPOCHS_PER_PASS[quick]
    many = repeated(manifest, epochs)
    paths = readable_paths(recipe.data.root, many, "train")
    columns, decode, arrow = _columns_and_decode(recipe, manifest)
    split = manifest["splits"]["train"]
    row_bytes = sum(sh["bytes"] for sh in split["shards"]) / split["rows"]
    bs = recipe.train.batch_size
    repeats = 3 if quick else 5
    workers = os.cpu_count() or 1
    train_ds = task.datasets(recipe, many)["train"]  # built once: every pass executes it again

    def pyarrow(decoded: bool):
        def make():
            tables = iter_tables(paths, columns, bs)
            return (decode(t if arrow else as_numpy(t)) for t in tables) if decoded else tables

        return make

    loaders = {}

    def dataloader(n: int, decoded: bool):
        def make():
            key = (n, decoded)
            if key not in loaders:  # persistent workers: started by the warm-up pass, kept for the rest
                ds = ParquetBatches(paths, columns, bs, decode if decoded else None, arrow)
                extra = {"persistent_workers": True, "multiprocessing_context": "forkserver"} if n else {}
                loaders[key] = DataLoader(
                    ds, batch_size=None, num_workers=n, prefetch_factor=2 if n else None, **extra
                )
            return iter(loaders[key])

        return make

    def ray_pipeline(decoded: bool):
        def make():
            if decoded:  # what a training epoch reads, batched as the worker batches it
                return train_batches(train_ds, task, recipe, epoch=0)
            ds = ray.data.read_parquet(paths).select_columns(columns)
            return ds.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2)

        return make

    if recipe.task == "recsys":  # training shuffles rows each epoch: the same pipeline without that
        from data_loaders import recsys as data

        unshuffled = data.read_split(recipe.data.root, "train", many)
        n = timed_passes(
            lambda: unshuffled.iter_batches(
                batch_size=bs, batch_format="numpy", drop_last=True, prefetch_batches=2
            ),
            repeats,
        )
        n["mb_per_s"] = n["rows_per_s"] * row_bytes / 1e6
        progress(f"recsys ingest ray+decode without the row shuffle: {n['rows_per_s']:.0f} rows/s")

    methods = {
        "pyarrow": pyarrow,
        "dataloader_0": functools.partial(dataloader, 0),
        f"dataloader_{workers}": functools.partial(dataloader, workers),
        "ray": ray_pipeline,
    }
    result: dict = {
        "batch_size": bs,
        "rows": split["rows"],
        "epochs_per_pass": epochs,
        "row_bytes": row_bytes,
        "workers": workers,
        "methods": {},
    }
    for name, method in methods.items():
        for decoded in (False, True):
            key = f"{name}{'+decode' if decoded else ''}"
            rate = timed_passes(method(decoded), repeats)
            rate["mb_per_s"] = rate["rows_per_s"] * row_bytes / 1e6
            result["methods"][key] = rate
            progress(
                f"{recipe.task} ingest {key}: {rate['rows_per_s']:.0f} rows/s ({rate['mb_per_s']:.1f} MB/s), "
                f"first batch {rate['first_batch_s']:.2f} s"
            )
    loaders.clear()  # persistent workers end with their DataLoader
    if recipe.task == "recsys":
        result["methods"]["ray+decode (no shuffle)"] = n

    # what training consumes: the plain PyTorch step on the recipe's thread count
    loop = ts.PlainLoop(recipe)
    batches = ts.memory_batches(recipe)
    ts.with_threads(ts.threads_of(recipe), lambda: [loop.step(b) for b in batches])  # warm-up
    tic = time.perf_counter()
    ts.with_threads(ts.threads_of(recipe), lambda: [loop.step(b) for b in batches])
    steps = max(1, round(1.0 / ((time.perf_counter() - tic) / len(batches))))
    train = ts.plain_rate(loop, batches, steps, repeats=repeats)
    result["training_samples_per_s"] = train["median"]
    m = result["methods"]
    decoded_loaders = [k for k in m if k.startswith("dataloader_") and k.endswith("+decode")]
    best = max(decoded_loaders, key=lambda k: m[k]["rows_per_s"])
    result["dataloader_compared"] = best
    result["ray_vs_dataloader"] = m["ray+decode"]["rows_per_s"] / m[best]["rows_per_s"]
    # the same after each pass's first batch: what is left once Ray Data's start-up is paid
    result["ray_vs_dataloader_steady"] = m["ray+decode"]["steady_rows_per_s"] / m[best]["steady_rows_per_s"]
    result["ray_vs_training"] = m["ray+decode"]["rows_per_s"] / train["median"]
    progress(
        f"{recipe.task} ingest: Ray Data {result['ray_vs_dataloader']:.2f}x {best} "
        f"({result['ray_vs_dataloader_steady']:.2f}x after the first batch), "
        f"{result['ray_vs_training']:.1f}x what training consumes ({train['median']:.0f} samples/s)"
    )
    return result


def run(tasks: list[str], quick: bool, work_dir: Path, progress: Callable[[str], None]) -> dict:
    from cluster.local import connect

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    connect()
    out = {"tasks": {}}
    for task in tasks:
        recipe = ts.recipe(task, quick, work_dir)
        progress(f"{task}: preparing data at {recipe.data.root}")
        out["tasks"][task] = measure_task(recipe, quick, progress)
    out["timed"] = __doc__.split("\n\n", 1)[1].strip()
    return out


def rows(result: dict) -> list[tuple[str, str, str]]:
    out = []
    for task, r in result["tasks"].items():
        for key, m in r["methods"].items():
            out.append(
                (
                    task,
                    f"ingest {key}",
                    f"{m['rows_per_s']:.0f} rows/s, {m['mb_per_s']:.1f} MB/s (first batch {m['first_batch_s']:.2f} s)",
                )
            )
        out.append(
            (task, f"Ray Data / {r['dataloader_compared']} (decoded)", f"{r['ray_vs_dataloader']:.2f}x")
        )
        out.append(
            (
                task,
                "the same after each pass's first batch",
                f"{r['ray_vs_dataloader_steady']:.2f}x (Ray Data's start-up left out)",
            )
        )
        out.append(
            (
                task,
                "Ray Data decoded / training consumption",
                f"{r['ray_vs_training']:.1f}x ({r['training_samples_per_s']:.0f} samples/s)",
            )
        )
    return out


def targets(result: dict) -> list[dict]:
    out = []
    for task, r in result["tasks"].items():
        out.append(
            target(
                "ingest: Ray Data / DataLoader (decoded)",
                task,
                r["ray_vs_dataloader"],
                RAY_VS_DATALOADER,
            )
        )
        out.append(
            target("ingest: Ray Data / training consumption", task, r["ray_vs_training"], INGEST_VS_TRAINING)
        )
    return out
