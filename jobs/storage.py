"""One discipline for what several processes may write at once (the model registry, run
directories): a file appears whole or not at all, one writer holds a lock that names it, and no
credential inside a URI reaches a message, a file name or a file.

Locks: on a local or NFS path, a kernel lock (flock) on a file whose content names the holder
(pid, host, since). The kernel drops it when the holder dies, however it dies, so a killed
process never leaves a lock behind. Object stores (s3://, gs://) have no locks: there the lock is
an object naming its holder, created only where none exists and read back to confirm (a
conditional write cannot be expressed through pyarrow's filesystems); a holder that died leaves
it behind, and it is taken over once older than `stale_s`, or at once when its pid is gone from
this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jobs.errors import UserError

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature")


def redact(uri: str) -> str:
    """The URI without credentials: no user:password@ and no secret-looking query value."""
    if "://" not in str(uri):
        return str(uri)
    parts = urlsplit(str(uri))
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [
        (k, "***" if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in parse_qsl(parts.query)
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*:/"), parts.fragment))


def is_local(filesystem: Any) -> bool:
    """None stands for the local filesystem."""
    from pyarrow import fs

    return filesystem is None or isinstance(filesystem, fs.LocalFileSystem)


def write_atomic(filesystem: Any, path: str, data: bytes) -> None:
    """Write a whole file: readers see the old content or the new, never a part. Locally through
    a temporary file and a rename; an object store's PUT is already all-or-nothing."""
    if not is_local(filesystem):
        with filesystem.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "token": uuid.uuid4().hex}


def _alive_here(owner: dict) -> bool:
    """Whether the holder may still be running (False only when it provably is not)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {since})"


class Lock:
    """An exclusive lock on `path` (a file next to what it guards) of `filesystem` (a pyarrow
    filesystem; None: local), held by this process.

    wait_s: how long to wait for the holder to let go (0: fail at once); what: the words the
    refusal names (e.g. "run runs/tiny"). Raises UserError naming the holder."""

    def __init__(self, filesystem: Any, path: str, what: str, wait_s: float = 0.0, stale_s: float = 600.0):
        self.fs, self.path, self.what, self.wait_s, self.stale_s = filesystem, path, what, wait_s, stale_s
        self._fd: int | None = None
        self._token: str | None = None

    def __enter__(self) -> Lock:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_local() if is_local(self.fs) else self._try_object()
            if holder is None:
                return self
            if time.monotonic() >= deadline:
                raise UserError(f"{self.what} is in use by {describe(holder)}; lock: {redact(self.path)}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._token is not None:
            with contextlib.suppress(OSError):
                if self._read_object().get("token") == self._token:
                    self.fs.delete_file(self.path)
            self._token = None

    def _try_local(self) -> dict | None:
        """None once held; else the holder's record."""
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                return {}
            finally:
                os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self._fd = fd
        return None

    def _read_object(self) -> dict:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read().decode() or "{}")
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"since": 0}

    def _try_object(self) -> dict | None:
        holder = self._read_object()
        if holder and _alive_here(holder) and time.time() - float(holder.get("since", 0)) < self.stale_s:
            return holder
        mine = _owner()
        write_atomic(self.fs, self.path, json.dumps(mine).encode())
        time.sleep(0.1)  # a writer racing us wrote within this window: the last write wins
        if self._read_object().get("token") == mine["token"]:
            self._token = mine["token"]
            return None
        return self._read_object()
