"""Files on disk: atomic writes, content-addressed stage directories, completion markers, locks.

A stage directory is written under a temporary name and renamed into place; its `DONE` marker
(holding the checksums of every file) is written last. A directory without its marker, or whose
files no longer match their checksums, is treated as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ablate.errors import AblateError

MARKER = "DONE"


def stable_hash(obj: Any) -> str:
    """A printable key for a JSON-able object (sorted keys, so dict order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def mark_done(directory: Path, meta: dict | None = None) -> None:
    """Write the completion marker last: checksums of every file in `directory`."""
    files = {p.relative_to(directory).as_posix(): file_digest(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}
    write_json(directory / MARKER, {"files": files, **(meta or {})})


def is_done(directory: Path, verify: bool = True) -> bool:
    """True when the marker exists and (with verify) every listed file matches its checksum."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return False
    try:
        files = read_json(marker)["files"]
    except (ValueError, KeyError):
        return False
    if not verify:
        return True
    for rel, digest in files.items():
        p = Path(directory) / rel
        if not p.is_file() or file_digest(p) != digest:
            return False
    return True


def corrupt_files(directory: Path) -> list[str]:
    """Files listed in the marker that are missing or differ from their checksum."""
    try:
        files = read_json(Path(directory) / MARKER)["files"]
    except (OSError, ValueError, KeyError):
        return [MARKER]
    return [rel for rel, d in files.items()
            if not (Path(directory) / rel).is_file() or file_digest(Path(directory) / rel) != d]


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield a temp directory next to `final`; on success rename it to `final` (replacing an
    incomplete one). On failure the temp directory is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunLock:
    """One writer per run directory: a lock file holding the owner's host and pid."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = self._owner()
                if other and self._alive(other):
                    raise AblateError(
                        f"Run directory {self.path.parent} is in use by another `ablate run` "
                        f"(pid {other.get('pid')} on {other.get('host')}). Wait for it to finish, or stop "
                        f"it; if that process is gone, delete {self.path}.") from None
                self.path.unlink(missing_ok=True)  # stale lock of a dead process
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot check a process on another host: assume it runs
        try:
            os.kill(int(owner["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return False
        except PermissionError:
            return True
        return True
