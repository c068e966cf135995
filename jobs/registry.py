"""Model registry: `<uri>/<task>/<version>/` holding an exported model, its card and its stage.

The uri is a local folder or any pyarrow filesystem URI (s3://, gs://, hdfs://), so a cluster's
serving nodes read what its training nodes registered. A version is written once
(`model.safetensors`, `model_card.json` with the test metrics and lineage, and every other file
the export wrote, such as recsys's `tracks.parquet`); only `stage.json` changes afterwards
(candidate -> production -> archived, with the history of each move).

Writers take the task's lock (`<task>/.lock`, jobs.storage): registrations get distinct numbers
and promotions leave one production version. `stage.json` is written last and whole, so a
version folder without it (a registration cut short) is not a version: readers skip it and the
next registration numbers past it. The card names the sha256 of every file; fetched copies are
checked against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from data_loaders.shards import sha256_file
from jobs import tasks
from jobs.errors import UserError
from jobs.export import CARD, WEIGHTS
from jobs.storage import Lock, is_local, redact, write_atomic

STAGES = ("candidate", "production", "archived")
STAGE = "stage.json"
VERSION = re.compile(r"v[1-9][0-9]*")
LOCK_WAIT_S = 120.0  # a registration copies a model: seconds, minutes from object storage


def check_version(version: str) -> str:
    if not VERSION.fullmatch(str(version)):
        raise UserError(f"'{version}' is not a registry version (v1, v2, ...)")
    return version


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
        self.uri = redact(uri)  # what messages and files name: never a credential
        if "://" in uri:
            try:
                self.fs, self.root = fs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types for bad or unreachable URIs
                raise UserError(f"registry {self.uri}: {redact(str(e).splitlines()[0])}") from None
        else:
            self.fs, self.root = fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    # ------------------------------------------------------------------ reading

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def _write_json(self, path: str, data: dict) -> None:
        write_atomic(self.fs, path, json.dumps(data, indent=2).encode())

    def lock(self, task: str) -> Lock:
        """The task's writer lock: registrations and stage moves take it in turn."""
        self.fs.create_dir(self._path(task), recursive=True)
        return Lock(self.fs, self._path(task, ".lock"), f"registry {self.uri} ({task})", wait_s=LOCK_WAIT_S)

    def tasks(self) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return sorted(
            i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name in tasks.names()
        )

    def _folders(self, task: str) -> list[str]:
        """Every version folder of a task, complete or not, oldest first."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self._path(task), allow_not_found=True))
        names = [
            i.base_name for i in infos if i.type == fs.FileType.Directory and VERSION.fullmatch(i.base_name)
        ]
        return sorted(names, key=lambda v: int(v[1:]))

    def _complete(self, task: str, complete: bool = True) -> list[str]:
        """The version folders with a stage (or, complete=False, those without one)."""
        folders = self._folders(task)
        stages = self.fs.get_file_info([self._path(task, v, STAGE) for v in folders])
        return [v for v, info in zip(folders, stages, strict=True) if (info.size is not None) == complete]

    def incomplete(self, task: str) -> list[str]:
        """Version folders without a stage: registrations cut short (skipped by every reader)."""
        return self._complete(task, complete=False)

    def versions(self, task: str) -> list[dict]:
        """Every version of a task, oldest first: its card (with test metrics) and its stage."""
        return [self.entry(task, v) for v in self._complete(task)]

    def entry(self, task: str, version: str) -> dict:
        check_version(version)
        try:
            stage = self._read_json(self._path(task, version, STAGE))
            card = self._read_json(self._path(task, version, CARD))
        except FileNotFoundError:
            known = ", ".join(self._complete(task)) or "none"
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
        made before the version's files were all fetched, is completed, not trusted. The cache
        is keyed by the registry (its URI without credentials) and checked against the card's
        sha256 of every file: two registries' v3 never share a copy."""
        from pyarrow import fs

        entry = self.resolve(task, version, stage)
        src = self._path(task, entry["version"])
        if is_local(self.fs):
            return Path(src)
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        dest = (
            Path(cache or Path.home() / ".cache" / "deepfleet" / "registry") / key / task / entry["version"]
        )
        sums = entry.get("files", {})
        infos = self.fs.get_file_info(fs.FileSelector(src, recursive=True))
        for info in infos:
            rel = info.path[len(src.rstrip("/")) + 1 :]
            local = dest / rel
            # a version is written once; stage.json changes, and the entry above has read it
            if info.type != fs.FileType.File or rel == STAGE:
                continue
            fetched = local.is_file() and local.stat().st_size == info.size
            if fetched and (rel not in sums or sha256_file(str(local)) == sums[rel]):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")  # never a half-copied file under its name
            fs.copy_files(
                info.path,
                str(partial),
                source_filesystem=self.fs,
                destination_filesystem=fs.LocalFileSystem(),
            )
            if rel in sums and sha256_file(str(partial)) != sums[rel]:
                partial.unlink()
                raise UserError(
                    f"registry {self.uri}: {task} {entry['version']}/{rel} does not match its card's sha256"
                )
            partial.replace(local)
        return dest

    # ------------------------------------------------------------------ writing

    def register(
        self, model_dir: Path, *, test_metrics: dict, lineage: dict, stage: str = "candidate"
    ) -> dict:
        """Copy an exported model in as the task's next version. Registering the same model
        (same lineage) twice returns the existing version: a resumed sweep does not duplicate it."""
        card = json.loads((Path(model_dir) / CARD).read_text())
        task = card["task"]
        if not (Path(model_dir) / WEIGHTS).is_file():
            raise UserError(f"no exported model at {model_dir} ({WEIGHTS} missing)")
        lineage = {**card.get("lineage", {}), **lineage}
        with self.lock(task):
            for existing in self.versions(task):
                if existing.get("lineage") == lineage:
                    return existing
            # past every folder, complete or not: a registration cut short keeps its number
            version = f"v{max((int(v[1:]) for v in self._folders(task)), default=0) + 1}"
            sums = self._copy_in(Path(model_dir), task, version)
            card.update(test_metrics=test_metrics, lineage=lineage, registered=_now(), files=sums)
            self._write_json(self._path(task, version, CARD), card)
            # last: the version exists once its stage does
            self._write_json(
                self._path(task, version, STAGE),
                {"stage": stage, "history": [{"stage": stage, "at": _now(), "why": "registered"}]},
            )
        return self.entry(task, version)

    def _copy_in(self, model_dir: Path, task: str, version: str) -> dict[str, str]:
        """Every file of the export (weights, and what the task carries: recsys's track
        catalogue) but the card and stage, which are the registry's; their sha256 by name."""
        from pyarrow import fs

        self.fs.create_dir(self._path(task, version), recursive=True)
        sums = {}
        for path in sorted(model_dir.rglob("*")):
            rel = path.relative_to(model_dir).as_posix()
            if not path.is_file() or rel in (CARD, STAGE):
                continue
            if "/" in rel:
                self.fs.create_dir(self._path(task, version, *rel.split("/")[:-1]), recursive=True)
            sums[rel] = sha256_file(str(path))
            fs.copy_files(
                str(path),
                self._path(task, version, *rel.split("/")),
                source_filesystem=fs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        return sums

    def set_stage(self, task: str, version: str, stage: str, why: str) -> dict:
        """Move a version to a stage; a new production version archives the previous one."""
        if stage not in STAGES:
            raise UserError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        with self.lock(task):
            entry = self.entry(task, version)
            if stage == "production":
                for other in self.versions(task):
                    if other["stage"] == "production" and other["version"] != version:
                        self._move(task, other["version"], "archived", f"replaced by {version}")
            self._move(task, version, stage, why)
        return {**entry, "stage": stage}

    def _move(self, task: str, version: str, stage: str, why: str) -> None:
        path = self._path(task, version, STAGE)
        state = self._read_json(path)
        state["stage"] = stage
        state["history"].append({"stage": stage, "at": _now(), "why": why})
        self._write_json(path, state)
