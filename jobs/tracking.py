"""Rank and logging live here: W&B from rank 0 only, progress from rank 0 to the driver, and
what reaches the console (deepfleet's own lines; Ray's and the libraries' go to the run's logs)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.local import verbose

# loggers whose records a user did not ask to see; their errors still reach the console
_NOISY = ("ray", "ray.data", "py.warnings")


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Driver side, for the length of a run: Ray's INFO lines and warnings from libraries append
    to `path` (the run's logs/driver.log) instead of the console. Nothing changes with --verbose."""
    if verbose():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    saved = []
    for name in _NOISY:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, [(h, h.level) for h in logger.handlers]))
        for h in logger.handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
            for h, h_level in handlers:
                h.setLevel(h_level)
        logging.captureWarnings(False)
        handler.close()


def output_to_file(path: Path) -> None:
    """Worker side: this process's stdout and stderr (prints, warnings, DeepSpeed's and torch's
    C++ lines, Ray Train's result dumps) append to `path`, the rank's log in the run directory,
    instead of Ray's worker logs, which Ray forwards to the driver's console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def wandb_id(run_dir: Path) -> str:
    """Stable across resumes of one run directory, distinct between directories."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:48]
    return f"{slug}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"


class RunLogger:
    """W&B run of rank 0; every other rank gets a no-op. Offline files live under the run dir."""

    def __init__(self, rank: int, recipe, run_dir: Path):
        self.run = None
        self.path: str | None = None
        if rank != 0 or recipe.wandb.mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=recipe.wandb.project,
            entity=recipe.wandb.entity,
            group=recipe.wandb.group or recipe.task,
            name=recipe.run_name,
            id=wandb_id(run_dir),
            resume="allow",
            dir=str(run_dir),
            mode=recipe.wandb.mode,
            config=recipe.model_dump(mode="json"),
            settings=wandb.Settings(silent=True, console="off"),
        )
        # offline: the folder `wandb sync` uploads; online: the run's page
        self.path = str(Path(self.run.dir).parent) if recipe.wandb.mode == "offline" else self.run.url

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class StepClock:
    """Where a window of training steps spent its time: waiting for the input pipeline's next
    batch, or computing (forward, loss, backward, optimizer step). Progress lines carry both
    per optimizer step (`wait_s`, `step_s`), and the compute's CPU time on the training thread
    (`step_cpu_s`: unlike wall time, other processes on a shared machine barely move it), so
    the engine's own step is told apart from its data loading (jobs.bench.train_step)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """A new window starts now."""
        self._mark, self._cpu_mark = time.perf_counter(), time.thread_time()
        self.wait = self.compute = self.compute_cpu = 0.0

    def _lap(self) -> tuple[float, float]:
        now, cpu = time.perf_counter(), time.thread_time()
        lap = (now - self._mark, cpu - self._cpu_mark)
        self._mark, self._cpu_mark = now, cpu
        return lap

    def ready(self) -> None:
        """A batch arrived: the time since the last mark was spent waiting for it."""
        self.wait += self._lap()[0]

    def done(self) -> None:
        """A micro-batch's forward, backward and step are done: the time since ready() was compute."""
        wall, cpu = self._lap()
        self.compute += wall
        self.compute_cpu += cpu

    def skip(self) -> None:
        """Leave the time since the last mark out (a checkpoint inside a window)."""
        self._lap()

    def per_step(self, steps: int) -> dict[str, float]:
        steps = max(steps, 1)
        return {
            "step_s": self.compute / steps,
            "step_cpu_s": self.compute_cpu / steps,
            "wait_s": self.wait / steps,
        }


class Progress:
    """Driver side: reads rank 0's progress messages, appends them to metrics.jsonl, shows them.

    On a terminal a live bar (step, loss, samples/s); in logs (`ray job logs`, CI) one line per message.
    """

    def __init__(self, queue, metrics_path: Path, total_steps: int, title: str, echo: bool = True):
        from rich.console import Console

        self.queue, self.path, self.total, self.title = queue, metrics_path, total_steps, title
        self.echo = echo
        self.console = Console(stderr=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._bar = None
        self._shown_step: int | None = None
        self._shown_at = 0.0

    def __enter__(self) -> Progress:
        if self.echo and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total, info="starting workers...")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        if self._bar is not None:
            self._bar.stop()

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float | None = None) -> None:
        try:
            items = (
                self.queue.get_nowait_batch(self.queue.qsize())
                if timeout is None
                else [self.queue.get(timeout=timeout)]
            )
        except Exception:  # empty queue (or the queue actor is gone with the cluster)
            return
        with self.path.open("a") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
                if self.echo:
                    self._show(item)

    def _show(self, m: dict) -> None:
        kind = m.get("kind")
        if kind == "train":
            info = f"epoch {m['epoch']}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['samples_per_s']:.1f} samples/s"
            if self._bar is not None:
                self._bar.update(self._task, completed=m["step"], info=info)
            elif self._due(m["step"]):
                self._print(f"step {m['step']}/{self.total}  {info}")
        elif kind == "val":
            shown = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "time")
            self._print(f"validation after epoch {m['epoch']} (step {m['step']}): {shown}")
        elif kind == "setup":
            stage = f"ZeRO {m['zero_stage']}"
            if m.get("recipe_zero_stage") != m["zero_stage"]:
                stage += f" (recipe: {m.get('recipe_zero_stage')}; one rank without offload runs 0)"
            offload = f", offload {m['offload']}" if m.get("offload", "none") != "none" else ""
            self._print(
                f"workers: {m['world']} on {m['device']}, {m['dtype']}, {stage}{offload}, "
                f"{m.get('threads', '?')} torch thread(s) each"
            )
        elif kind == "restore":
            self._print(f"resumed from the checkpoint of step {m['step']} (epoch {m['epoch']})")

    # in logs, a step line every tenth of the run (and at least every few minutes), not every window
    LOG_FRACTION, LOG_SECONDS = 0.1, 300.0

    def _due(self, step: int) -> bool:
        now = time.monotonic()
        due = (
            self._shown_step is None
            or step >= self.total
            or step - self._shown_step >= self.LOG_FRACTION * self.total
            or now - self._shown_at >= self.LOG_SECONDS
        )
        if due:
            self._shown_step, self._shown_at = step, now
        return due

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)
