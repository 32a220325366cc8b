"""Files on disk: atomic writes, content-addressed stage directories, completion markers, locks,
and nested tensor states in safetensors.

A stage directory is written under a temporary name and renamed into place; its `DONE` marker
(the sha256 of every file, plus the content digests of the inputs it was built from) is written
last. A directory without its marker, or whose files no longer match their checksums, is treated
as absent. Nothing here unpickles: artifacts are safetensors or JSON.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ablate.errors import AblateError, InputError

if TYPE_CHECKING:  # torch is imported where tensors are handled, so `ablate clean` and `report` start fast
    import torch

MARKER = "DONE"
# Files that record how an artifact was made (timings, summaries). Dependants never read them as
# data, so they are left out of the artifact's content digest: a stage recomputed with identical
# data keeps its dependants even though its timings differ.
RECORD_FILES = frozenset({"info.json", "stats.json", "outcome.json", "metrics.csv"})
TEMP_SUFFIX = ".tmp"
RUN_LOCK = ".lock"  # in a run directory
STAGES_FILE = "stages.json"  # in a run directory: the cache keys it uses, written as each stage is resolved
STAGE_LOCKS = ".locks"  # folder of per-entry locks in a cache directory


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


# ------------------------------------------------------------------------------ atomic files


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
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


def remove_tree(target: Path, inside: Path, ignore_errors: bool = False) -> None:
    """shutil.rmtree(target), refused (AblateError) unless `target`, with links and `..` resolved,
    lies strictly inside `inside`, the directory it belongs to."""
    real, root = Path(target).resolve(), Path(inside).resolve()
    if root not in real.parents:
        raise AblateError(f"Refusing to delete {target}: it resolves to {real}, which is not inside {root}. "
                          f"Nothing was deleted; a name or link points outside its directory — fix it.")
    shutil.rmtree(target, ignore_errors=ignore_errors)


def remove_temps(directory: Path, name: str = "") -> list[Path]:
    """Delete leftovers of interrupted atomic writes in `directory` (the hidden `.{name}*.tmp`
    files and directories; every one when name is empty). Only call this while holding the lock
    that covers them."""
    removed = []
    for p in sorted(Path(directory).glob(f".{name}*{TEMP_SUFFIX}")) if Path(directory).is_dir() else []:
        remove_tree(p, directory) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------- markers


def mark_done(directory: Path, inputs: dict[str, str] | None = None, exclude: tuple[str, ...] = ()) -> None:
    """Write the completion marker last: checksums of every file in `directory` (except
    `exclude`) and `inputs`, the content digests of the artifacts it was built from."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): file_digest(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER and p.name not in exclude}
    write_json(directory / MARKER, {"files": files, "inputs": dict(inputs or {})})


def read_marker(directory: Path) -> dict | None:
    try:
        marker = read_json(Path(directory) / MARKER)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    return marker


def is_done(directory: Path, verify: bool = True) -> bool:
    """True when the marker exists and (with verify) every listed file matches its checksum."""
    if read_marker(directory) is None:
        return False
    return not verify or not corrupt_files(directory)


def corrupt_files(directory: Path) -> list[str]:
    """Files listed in the marker that are missing or differ from their checksum."""
    marker = read_marker(directory)
    if marker is None:
        return [MARKER]
    return [rel for rel, d in marker["files"].items()
            if not (Path(directory) / rel).is_file() or file_digest(Path(directory) / rel) != d]


def content_digest(directory: Path) -> str | None:
    """A digest of the data files an artifact's marker lists (RECORD_FILES left out); None
    without a marker. Equal digests = byte-identical data."""
    marker = read_marker(directory)
    if marker is None:
        return None
    data = {rel: d for rel, d in marker["files"].items() if Path(rel).name not in RECORD_FILES}
    return stable_hash(data)


def marker_inputs(directory: Path) -> dict[str, str] | None:
    marker = read_marker(directory)
    return None if marker is None else marker.get("inputs", {})


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield a temp directory next to `final`; on success rename it to `final` (replacing an
    incomplete one). On failure the temp directory is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=TEMP_SUFFIX))
    try:
        yield tmp
        if final.exists():
            remove_tree(final, final.parent)
        os.replace(tmp, final)
    except BaseException:
        remove_tree(tmp, final.parent, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ tensor trees


def save_tree(path: Path, tree: Any) -> None:
    """Write nested dicts/lists/tuples of tensors and JSON scalars to one safetensors file,
    atomically. Tensors become entries `t0, t1, …`; the structure is JSON in the metadata
    (dict keys keep their type, so an optimiser's integer state keys survive)."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").clone().contiguous()
            return {"$tensor": name}
        if isinstance(x, dict):
            if not all(isinstance(k, (str, int)) for k in x):
                raise TypeError(f"state dict keys must be str or int, got {[type(k).__name__ for k in x]}")
            return {"$dict": [[k, encode(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"$tuple": [encode(v) for v in x]}
        if isinstance(x, list):
            return [encode(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {"$float": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a tensor tree")

    structure = json.dumps(encode(tree), allow_nan=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"tree": structure})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tree(path: Path) -> Any:
    """Read a file written by save_tree; InputError when it is missing, truncated or malformed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            structure = json.loads((f.metadata() or {})["tree"])
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors/json raise assorted types on damaged files
        raise InputError(f"{path} is not a readable state file ({type(exc).__name__}: {exc}).") from exc

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        (tag, value), = x.items()
        if tag == "$tensor":
            return tensors[value]
        if tag == "$dict":
            return {k: decode(v) for k, v in value}
        if tag == "$tuple":
            return tuple(decode(v) for v in value)
        if tag == "$float":
            return float(value)
        raise InputError(f"{path} holds an unknown entry {tag!r}; it was not written by ablate.")

    try:
        return decode(structure)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path} has a malformed structure ({exc}); it was not written by ablate.") from exc


def check_tensor(t: torch.Tensor, what: str, shape: tuple[int | None, ...], dtype: torch.dtype, path: Path) -> None:
    """InputError unless `t` has `dtype` and `shape` (None = any size along that axis)."""
    ok = t.dtype == dtype and t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise InputError(f"{path}: {what} is {tuple(t.shape)} {t.dtype}, expected {want} {dtype}. The artifact was "
                         f"written by different code or altered; delete {Path(path).parent} and run again to "
                         f"recompute it.")


# ------------------------------------------------------------------------------------ locks


def _owner_text(path: Path) -> dict:
    """The JSON a lock holder wrote into its lock file (retried briefly: it writes right after
    locking)."""
    for _ in range(20):
        try:
            owner = json.loads(Path(path).read_text())
            if isinstance(owner, dict):
                return owner
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "a process that has not written its id yet"
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '?')}")


class FileLock:
    """An exclusive advisory lock (flock) on `path`, holding the owner's pid, host, start time
    and command line. The kernel releases it when the holder exits, even on SIGKILL, so a lock
    is never stale."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool, on_wait: Callable[[dict], None] = lambda owner: None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            on_wait(_owner_text(self.path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def owner(self) -> dict:
        return _owner_text(self.path)


class RunLock(FileLock):
    """One writer per run directory: a second `ablate run` on it refuses, naming the holder."""

    def __init__(self, run_dir: Path):
        super().__init__(Path(run_dir) / RUN_LOCK)

    def __enter__(self):
        if not self.acquire(wait=False):
            raise AblateError(
                f"Run directory {self.path.parent} is in use by another `ablate run` ({_describe(self.owner())}). "
                f"Wait for it to finish or stop it (Ctrl-C saves its progress), then run again.")
        return self

    def __exit__(self, *exc):
        self.release()


def is_locked(path: Path) -> bool:
    """Whether some process holds the FileLock at `path` now."""
    if not Path(path).is_file():
        return False
    probe = FileLock(path)
    if probe.acquire(wait=False):
        probe.release()
        return False
    return True


@contextmanager
def stage_lock(cache: Path, name: str, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Serialise the computation of one cache entry across processes (two runs sharing a cache
    compute it once); on_wait(message) is called when another process holds it."""
    lock = FileLock(stage_lock_path(cache, name))
    lock.acquire(wait=True, on_wait=lambda owner: on_wait(f"waiting for {_describe(owner)}, which is computing {name}"))
    try:
        yield
    finally:
        lock.release()


def stage_lock_path(cache: Path, name: str) -> Path:
    return Path(cache) / STAGE_LOCKS / f"{name}.lock"
