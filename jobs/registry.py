"""Model registry: `<uri>/<task>/<version>/` holding an exported model, its card and its stage.

The uri is a local folder or any pyarrow filesystem URI (s3://, gs://, hdfs://), so a cluster's
serving nodes read what its training nodes registered. A version is written once
(`model.safetensors`, `model_card.json` with the test metrics and lineage, and every other file
the export wrote, such as recsys's `tracks.parquet`); only `stage.json` changes afterwards
(candidate -> production -> archived, with the history of each move).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from jobs import tasks
from jobs.errors import UserError
from jobs.export import CARD, WEIGHTS

STAGES = ("candidate", "production", "archived")
STAGE = "stage.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def gate_failures(task: str, metrics: dict, gate, production: dict | None, metric: str) -> list[str]:
    """Why a model with these test metrics may not become production (empty: it may).

    gate: a RegistryGate; production: the current production entry (or None); metric: the
    ranking metric compared with production's."""
    reported = tasks.reported(task)
    failures = []
    for name, bound in gate.thresholds.items():
        if name not in reported:
            raise UserError(
                f"registry.gate.thresholds names '{name}', which the {task} task does not report "
                f"({', '.join(reported)})"
            )
        value = metrics.get(name)
        if value is None:
            failures.append(f"{name} was not measured")
        elif tasks.goal(task, name) == "min" and value > bound:
            failures.append(f"{name} {value:.4f} is above the gate's {bound:.4f} by {value - bound:.4f}")
        elif tasks.goal(task, name) == "max" and value < bound:
            failures.append(f"{name} {value:.4f} misses the gate's {bound:.4f} by {bound - value:.4f}")
    if gate.beat_production and production is not None:
        ours, theirs = metrics.get(metric), production["test_metrics"].get(metric)
        if ours is not None and theirs is not None:
            worse = ours > theirs if tasks.goal(task, metric) == "min" else ours < theirs
            if worse:
                failures.append(
                    f"{metric} {ours:.4f} is {abs(ours - theirs):.4f} worse than production "
                    f"{production['version']}'s {theirs:.4f}"
                )
    return failures


class Registry:
    def __init__(self, uri: str | os.PathLike):
        from pyarrow import fs

        uri = str(uri)
        self.uri = uri
        if "://" in uri:
            try:
                self.fs, self.root = fs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types for bad or unreachable URIs
                raise UserError(f"registry {uri}: {str(e).splitlines()[0]}") from None
        else:
            self.fs, self.root = fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    # ------------------------------------------------------------------ reading

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def _write_json(self, path: str, data: dict) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(json.dumps(data, indent=2).encode())

    def tasks(self) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return sorted(
            i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name in tasks.names()
        )

    def versions(self, task: str) -> list[dict]:
        """Every version of a task, oldest first: its card (with test metrics) and its stage."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self._path(task), allow_not_found=True))
        names = [i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name[1:].isdigit()]
        return [self.entry(task, v) for v in sorted(names, key=lambda v: int(v[1:]))]

    def entry(self, task: str, version: str) -> dict:
        try:
            card = self._read_json(self._path(task, version, CARD))
            stage = self._read_json(self._path(task, version, STAGE))
        except FileNotFoundError:
            known = ", ".join(v["version"] for v in self.versions(task)) or "none"
            raise UserError(f"registry {self.uri}: no {task} model {version} (versions: {known})") from None
        return {**card, "version": version, "stage": stage["stage"], "history": stage["history"]}

    def resolve(self, task: str, version: str | None = None, stage: str = "production") -> dict:
        """The entry of a version, or of the newest version in a stage."""
        if version:
            return self.entry(task, version)
        found = [v for v in self.versions(task) if v["stage"] == stage]
        if not found:
            raise UserError(f"registry {self.uri}: no {task} model in stage {stage}")
        return found[-1]

    def production(self, task: str) -> dict | None:
        return next((v for v in reversed(self.versions(task)) if v["stage"] == "production"), None)

    def fetch(
        self, task: str, version: str | None = None, stage: str = "production", cache: Path | None = None
    ) -> Path:
        """A local folder holding the model, every file of its version (the registry's own folder
        when it is local). A cached copy is topped up with what it lacks: a fetch cut short, or
        made before the version's files were all fetched, is completed, not trusted."""
        from pyarrow import fs

        entry = self.resolve(task, version, stage)
        src = self._path(task, entry["version"])
        if isinstance(self.fs, fs.LocalFileSystem):
            return Path(src)
        dest = Path(cache or Path.home() / ".cache" / "deepfleet" / "registry") / task / entry["version"]
        infos = self.fs.get_file_info(fs.FileSelector(src, recursive=True))
        for info in infos:
            rel = info.path[len(src.rstrip("/")) + 1 :]
            local = dest / rel
            # a version is written once; stage.json changes, and the entry above has read it
            if info.type != fs.FileType.File or rel == STAGE:
                continue
            if local.is_file() and local.stat().st_size == info.size:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")  # never a half-copied file under its name
            fs.copy_files(
                info.path,
                str(partial),
                source_filesystem=self.fs,
                destination_filesystem=fs.LocalFileSystem(),
            )
            partial.replace(local)
        return dest

    # ------------------------------------------------------------------ writing

    def register(
        self, model_dir: Path, *, test_metrics: dict, lineage: dict, stage: str = "candidate"
    ) -> dict:
        """Copy an exported model in as the task's next version. Registering the same model
        (same lineage) twice returns the existing version: a resumed sweep does not duplicate it."""
        from pyarrow import fs

        card = json.loads((Path(model_dir) / CARD).read_text())
        task = card["task"]
        lineage = {**card.get("lineage", {}), **lineage}
        for existing in self.versions(task):
            if existing.get("lineage") == lineage:
                return existing
        numbers = [int(v["version"][1:]) for v in self.versions(task)]
        version = f"v{max(numbers, default=0) + 1}"
        dest = self._path(task, version)
        self.fs.create_dir(dest, recursive=True)
        # every file of the export (weights, and what the task carries: recsys's track catalogue);
        # the card is written below with the test metrics, the stage is the registry's own
        if not (Path(model_dir) / WEIGHTS).is_file():
            raise UserError(f"no exported model at {model_dir} ({WEIGHTS} missing)")
        for path in sorted(Path(model_dir).rglob("*")):
            rel = path.relative_to(model_dir).as_posix()
            if not path.is_file() or rel in (CARD, STAGE):
                continue
            if "/" in rel:
                self.fs.create_dir(self._path(task, version, *rel.split("/")[:-1]), recursive=True)
            fs.copy_files(
                str(path),
                self._path(task, version, *rel.split("/")),
                source_filesystem=fs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        card.update(test_metrics=test_metrics, lineage=lineage, registered=_now())
        self._write_json(self._path(task, version, CARD), card)
        self._write_json(
            self._path(task, version, STAGE),
            {"stage": stage, "history": [{"stage": stage, "at": _now(), "why": "registered"}]},
        )
        return self.entry(task, version)

    def set_stage(self, task: str, version: str, stage: str, why: str) -> dict:
        """Move a version to a stage; a new production version archives the previous one."""
        if stage not in STAGES:
            raise UserError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        entry = self.entry(task, version)
        if stage == "production":
            current = self.production(task)
            if current is not None and current["version"] != version:
                self._move(task, current["version"], "archived", f"replaced by {version}")
        self._move(task, version, stage, why)
        return {**entry, "stage": stage}

    def _move(self, task: str, version: str, stage: str, why: str) -> None:
        path = self._path(task, version, STAGE)
        state = self._read_json(path)
        state["stage"] = stage
        state["history"].append({"stage": stage, "at": _now(), "why": why})
        self._write_json(path, state)
