"""The `ray` executor: one Ray task per cell, on a local Ray or a cluster (docs/scale-out.md).

The driver (`ablate run`) builds every stage once, then submits each cell as a task asking for
`num_gpus_per_cell` GPUs (Ray sets the task's CUDA_VISIBLE_DEVICES) and `num_cpus_per_cell` CPUs.
A task gets its job as JSON and the --plugin files, reads its inputs from the shared cache by path
after checking their digests (nothing large travels through Ray), memory-maps the oracle so the
tasks of one node share its pages, and runs cell_job.run_cell. A task whose worker dies is retried
(`max_retries`; the cell resumes from its last checkpoint); an exception raised by the cell is not
retried: it becomes that cell's failure. The driver shows each running cell's progress from its
status.json; `status_command` (`ablate status RUN`) reads the same files, whichever executor ran.
With loggers, a task appends its cell's events to runs/<name>/.events/<cell>.jsonl as they happen
(shared storage, like the cache) and the driver hands them to the loggers at each poll (1 s).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from pydantic import Field, model_validator

from ablate.training import cells as cellmod
from ablate.pipeline import store
from ablate.pipeline.cell_job import CellJob, read_status, remember, run_cell, settled, write_status
from ablate.api.components import Params
from ablate.errors import AblateError, InputError, Interrupted
from ablate.pipeline.events import NO_EVENTS, CellFailed, EventFeed, EventFile
from ablate.pipeline.executors import Executor
from ablate.pipeline.ui import QuietUI

MISSING = "the ray executor needs Ray, which is not installed here: pip install 'ablate[ray]'"
STOP_FILE = ".stop"  # in the run directory while the driver asks its tasks to save and stop
EVENTS_DIR = ".events"  # in the run directory while loggers listen: <cell>.jsonl, the events its task wrote
POLL_SECONDS = 1.0
LOCAL_OBJECT_STORE = 256 * 2**20  # a local Ray carries only jobs and records: a small object store


class RayParams(Params):
    address: str | None = None  # "auto", "HOST:PORT" or "ray://HOST:PORT"; None: $RAY_ADDRESS, else start a local Ray
    num_gpus_per_cell: float = Field(1.0, ge=0)  # 0.5: two cells share a GPU
    num_cpus_per_cell: float = Field(1.0, gt=0)  # also the task's torch threads (rounded down, at least 1)
    max_retries: int = Field(2, ge=0)  # retries of a cell whose worker died (not of one that raised)
    local_num_cpus: int | None = None  # a locally started Ray declares these (default: what it detects)
    local_num_gpus: int | None = None

    @model_validator(mode="after")
    def _ray_installed(self):
        if importlib.util.find_spec("ray") is None:
            raise ValueError(MISSING)
        return self


class RayExecutor(Executor):
    name = "ray"
    description = "one Ray task per cell, on a local Ray or a cluster (pip install 'ablate[ray]')"
    Params = RayParams

    def run(self, jobs: list[CellJob], device: torch.device, stop, registry, ui) -> dict[str, dict]:
        try:
            import ray
        except ImportError:
            raise AblateError(MISSING) from None
        # cells with nothing to train (complete, or failed and not retried) are read back here
        records = {job.cell: run_cell(job, device, stop, registry, ui, self.events) for job in jobs if settled(job)}
        todo = [job for job in jobs if job.cell not in records]
        if todo:
            started = _connect(ray, self.params)
            try:
                gpus = _gpus_per_cell(ray, self.params, device, ui)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the stages' cached blocks would crowd a cell on this node's GPU
                records |= _dispatch(ray, self.params, gpus, todo, device, stop, registry, ui, self.events)
            finally:
                if started:
                    ray.shutdown()
        return {job.cell: records[job.cell] for job in jobs}


def _connect(ray, p: RayParams) -> bool:
    """Connect to the address or start a local Ray → whether this call started the connection."""
    if ray.is_initialized():  # this process is connected already (a notebook, the tests): use it
        return False
    address = p.address or os.environ.get("RAY_ADDRESS")
    if address and ":" in address:  # ray.init would wait for minutes on an address nothing listens at
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise AblateError(f"Nothing answers at the Ray address {address!r} ({exc}). Start the cluster first "
                              f"(`ray start --head` on its head node) or fix --address.") from None
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # ray.init takes SIGTERM's
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=p.local_num_cpus, num_gpus=p.local_num_gpus, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        fix = ("Start the cluster first (`ray start --head` on its head node) or drop --address (and $RAY_ADDRESS) "
               "to start a local one." if address else "See Ray's message; `ray stop` ends a Ray left running here.")
        where = f"connect to the Ray cluster at {address!r}" if address else "start a local Ray"
        raise AblateError(f"Could not {where}: {type(exc).__name__}: {exc}. {fix}") from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in kept.items():
                signal.signal(s, handler)
    return True


def _gpus_per_cell(ray, p: RayParams, device: torch.device, ui) -> float:
    """GPUs each task asks for; an error when no node could ever run one."""
    have = ray.cluster_resources()
    if have.get("CPU", 0) < p.num_cpus_per_cell:
        raise AblateError(f"Each cell asks for executor.num_cpus_per_cell = {p.num_cpus_per_cell} CPUs but the Ray "
                          f"cluster has {have.get('CPU', 0)}: lower it.")
    if p.num_gpus_per_cell == 0 or have.get("GPU", 0) >= p.num_gpus_per_cell:
        return p.num_gpus_per_cell
    if device.type == "cpu":
        ui.info(f"the Ray cluster has no GPU: cells train on CPUs ({p.num_cpus_per_cell:g} each)")
        return 0.0
    raise AblateError(f"Each cell asks for executor.num_gpus_per_cell = {p.num_gpus_per_cell:g} GPUs but the Ray "
                      f"cluster has {have.get('GPU', 0):g}, so no cell could start. Start Ray on GPU nodes, lower "
                      f"num_gpus_per_cell (0: CPU cells) or run with --device cpu.")


def _dispatch(ray, p: RayParams, gpus: float, jobs: list[CellJob], device, stop, registry, ui,
              events) -> dict[str, dict]:
    run_dir = jobs[0].cell_dir.parent.parent
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    feed = EventFeed(run_dir / EVENTS_DIR) if events else None  # the workers' events, read at each poll
    if feed is not None and feed.dir.exists():  # a killed driver's
        store.remove_tree(feed.dir, run_dir)
    task = ray.remote(max_calls=1)(_cell_task)  # a fresh process per cell: torch never keeps an earlier task's GPU
    args = (registry.plugin_files, str(device), gpus, os.getcwd(), max(1, int(p.num_cpus_per_cell)),
            None if feed is None else str(feed.dir))
    options = dict(num_gpus=gpus, num_cpus=p.num_cpus_per_cell, max_retries=p.max_retries, retry_exceptions=False)
    pending = {task.options(**options, name=f"ablate cell {job.cell}").remote(job.model_dump_json(), *args): job
               for job in jobs}
    records, interrupted, t0 = {}, False, time.time()
    try:
        with _Bars(ui) as bars:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    job = pending.pop(ref)
                    bars.drop(job.cell)
                    record = _settle(ray, ref, job, stop, ui, p.max_retries)
                    _deliver(feed, job.cell, events, record)
                    interrupted |= record["status"] == "interrupted"
                    records[job.cell] = record
                running = {job.cell: _running(job, t0) for job in pending.values()}
                for job in pending.values():
                    _deliver(feed, job.cell, events)
                if stop() and not stop_file.exists():  # tasks save at their next step and return
                    stop_file.write_text(f"{os.getpid()}\n")
                    for ref, job in pending.items():
                        if running[job.cell] is None:  # not started: no need to start it
                            ray.cancel(ref)
                for cell, status in running.items():
                    bars.show(cell, status)
    finally:
        for ref in pending:  # only when the driver itself stops abnormally (a second Ctrl-C, an error)
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        stop_file.unlink(missing_ok=True)
        if feed is not None:
            store.remove_tree(feed.dir, run_dir, ignore_errors=True)
    if interrupted or stop():
        raise Interrupted()
    return {job.cell: records[job.cell] for job in jobs}


def _deliver(feed: EventFeed | None, cell: str, events, record: dict | None = None) -> None:
    """The events a cell's worker wrote since the last look; a failed record its worker could not
    report (it died, or raised outside the cell's guarded steps) becomes the cell's cell_failed."""
    if feed is None:
        return
    for event in feed.read(cell):
        events(event)
    if record is not None and record["status"] == "failed" and cell not in events.settled:
        events(CellFailed(cell, str(record["error"]), record.get("step")))


def _running(job: CellJob, t0: float) -> dict | None:
    status = read_status(job.cell_dir)
    return status if status and status.get("state") == "running" and status.get("time", 0) >= t0 else None


def _settle(ray, ref, job: CellJob, stop, ui, retries: int) -> dict:
    """A finished task's record; a task that raised or whose worker kept dying is a failed cell."""
    try:
        record = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return {"status": "interrupted"}
    except ray.exceptions.RayTaskError as exc:  # the cell raised: not retried
        if stop():
            return {"status": "interrupted"}
        cause = getattr(exc, "cause", None) or exc
        return _task_failure(job, f"{type(cause).__name__}: {str(cause).strip()}", str(exc), ui)
    except ray.exceptions.RayError as exc:  # its worker died on every attempt (killed, out of memory, node lost)
        if stop():
            return {"status": "interrupted"}
        died = f"its worker died on each of {retries + 1} attempts ({type(exc).__name__})"
        return _task_failure(job, died, str(exc), ui)
    for level, msg in record.pop("messages", []):
        (ui.warn if level == "warn" else ui.info)(msg)
    if "dir" in record:
        record["dir"] = Path(record["dir"])
    if record["status"] == "done" and not record["cached"]:
        ui.info(f"[green]✓[/] cell {job.cell} trained in {record['outcome'].get('seconds') or 0:.1f}s")
    return record


def _task_failure(job: CellJob, error: str, details: str, ui) -> dict:
    log = job.cell_dir.parent.parent / "logs" / f"cell-{job.cell}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        store.write_atomic(log, details + "\n")
        error += f" (details: {log})"
    except OSError:
        pass
    write_status(job.cell_dir, "failed", error=error, failed_at_step=None, checkpoint_step=None)
    ui.warn(f"cell {job.cell} failed: {error}. It is not retried; the other cells still run.")
    return {"status": "failed", "error": error, "step": None, "checkpoint_step": None}


class _Bars:
    """One progress bar per running cell in a RichUI's console (none for a quiet UI)."""

    def __init__(self, ui):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = getattr(ui, "console", None)
        self.progress = None if console is None else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def show(self, cell: str, status: dict | None) -> None:
        if self.progress is None or status is None:
            return
        if cell not in self.tasks:
            where = f"{status.get('host')}, GPU {status.get('cuda_visible_devices') or '-'}"
            self.tasks[cell] = self.progress.add_task(f"cell {cell} ({where})", total=status.get("steps"))
        self.progress.update(self.tasks[cell], completed=status.get("step", 0))

    def drop(self, cell: str) -> None:
        if self.progress is not None and cell in self.tasks:
            self.progress.remove_task(self.tasks.pop(cell))


# ------------------------------------------------------------------------------ in the task


class _TaskUI(QuietUI):
    """Keeps the cell's messages; the driver prints them when the task returns."""

    def __init__(self):
        self.messages: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.messages.append(("info", msg))

    def warn(self, msg: str) -> None:
        self.messages.append(("warn", msg))


class _StopFile:
    """A task's stop flag: set once the driver wrote the run's stop file (looked at once a second)."""

    def __init__(self, path: Path):
        self.path, self.looked, self.set = path, 0.0, False

    def __call__(self) -> bool:
        if not self.set and time.time() - self.looked >= 1.0:
            self.looked, self.set = time.time(), self.path.exists()
        return self.set


def _cell_task(job_json: str, plugin_files: list[str], device: str, gpus: float, cwd: str, threads: int,
               events_dir: str | None = None) -> dict:
    """One cell in a Ray worker: its record, JSON-safe, with the messages it printed; its events
    appended to events_dir/<cell>.jsonl (when the run has loggers) as they happen."""
    from ablate.api.plugins import load_registry

    host = socket.gethostname()
    try:
        os.chdir(cwd)  # the run's relative paths (runs/, the cache) mean what they mean to the driver
    except OSError:
        raise InputError(f"The driver's directory {cwd} does not exist on {host}: the runs and cache directories "
                         f"must be on storage every node mounts at the same path (docs/scale-out.md).") from None
    torch.set_num_threads(threads)
    job = CellJob.model_validate_json(job_json)
    check_inputs(job)
    if gpus > 0 and torch.cuda.is_available():
        dev = torch.device("cuda")  # the GPU(s) Ray gave this task (CUDA_VISIBLE_DEVICES)
    elif torch.device(device).type == "cuda":
        raise InputError(f"The task on {host} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but the run trains on {device}.")
    else:
        dev = torch.device(device)
    ui = _TaskUI()
    _load_mapped_oracle(job)
    try:
        with _compile_cache(job, dev, ui):
            stop = _StopFile(job.cell_dir.parent.parent / STOP_FILE)
            events = NO_EVENTS if events_dir is None else EventFile(Path(events_dir) / f"{job.cell}.jsonl", ui.warn)
            record = run_cell(job, dev, stop, load_registry(plugin_files), ui, events)
    except Interrupted:
        return {"status": "interrupted", "messages": ui.messages}
    return {**record, **({"dir": str(record["dir"])} if "dir" in record else {}), "messages": ui.messages}


def check_inputs(job: CellJob) -> None:
    """InputError unless this node sees the very artifacts the driver built (by their digests)."""
    found = {"corpus": store.content_digest(job.corpus.path), "oracle": store.content_digest(job.oracle.path)}
    if job.spec.backbone.source == "pretrain":
        found["backbone"] = store.content_digest(job.backbone.path.parent)
    elif not job.backbone.path.is_file():
        found["backbone"] = None
    for what, digest in found.items():
        art = getattr(job, what)
        if digest != art.digest:
            raise InputError(f"The {what} at {art.path} on {socket.gethostname()} is not the one the driver built "
                             f"({'missing' if digest is None else 'other data'}): the cache directory must be on "
                             f"storage every node mounts at the same path (docs/scale-out.md).")


def _load_mapped_oracle(job: CellJob) -> None:
    """Load the job's oracle through memory maps and keep its variants for run_cell."""
    from ablate.oracle import build as oracle

    with mock.patch.object(oracle, "load_file", load_mapped):  # load_oracle's reader, in this process only
        loaded = oracle.load_oracle(job.oracle.path)
    remember("variants", job.oracle, cellmod.oracle_variants(loaded, job.spec))


@contextmanager
def _compile_cache(job: CellJob, device: torch.device, ui):
    """As executors.run_jobs does for the driver: the compiler's artifacts from and to the cache."""
    from ablate.training import compile_cache
    from ablate.training import fastpath

    if not (cellmod.compile_cells(job.spec) and fastpath.enabled_for(device)):
        yield
        return
    where = compile_cache.artifact_dir(Path(job.spec.cache_dir), device)
    known = compile_cache.load(where, ui.warn)[1]
    try:
        yield
    finally:
        try:
            compile_cache.save(where, known)
        except Exception as exc:  # a cache: failing to write it must not fail the cell
            ui.warn(f"could not save the compile cache to {where} ({type(exc).__name__}: {exc})")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def load_mapped(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as CPU views of one copy-on-write memory map of the file, so the
    processes of a node that read it share its pages (safetensors' load_file copies each tensor).
    A tensor whose bytes are misaligned for its dtype is copied."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES[info["dtype"]]
        start, end = (8 + n + offset for offset in info["data_offsets"])
        if end == start:
            flat = torch.empty(0, dtype=dtype)
        elif start % dtype.itemsize:
            flat = torch.frombuffer(bytearray(mapped[start:end]), dtype=dtype)
        else:
            flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


# ------------------------------------------------------------------------------ ablate status


def cell_states(run_dir: Path) -> list[dict]:
    """Every cell of a run (spec order) → {cell, state, detail}; state: pending | running |
    interrupted | done | failed. Running needs the run's lock held (its driver alive)."""
    spec_file, cells_dir = run_dir / "spec.resolved.json", run_dir / "cells"
    names = ([c["name"] for c in store.read_json(spec_file)["cells"]] if spec_file.is_file()
             else sorted(p.name for p in cells_dir.iterdir() if p.is_dir()) if cells_dir.is_dir() else [])
    active, now, rows = store.is_locked(run_dir / store.RUN_LOCK), time.time(), []
    for name in names:
        cell_dir, state, detail = cells_dir / name, "pending", ""
        status = read_status(cell_dir) or {}
        gpus = status.get("cuda_visible_devices")
        where = f"{status.get('host')} pid {status.get('pid')}, CUDA_VISIBLE_DEVICES={gpus}"
        step = f"step {status.get('step')}/{status.get('steps')}"
        if store.is_done(cell_dir, verify=False):
            state = "done"
            if status.get("finished") and status.get("started"):
                detail = f"{status['finished'] - status['started']:.0f}s on {where}"
        elif status.get("state") == "failed":
            state, detail = "failed", str(status.get("error"))
        elif status.get("state") == "running" and active:
            state, detail = "running", f"{step}, heartbeat {now - status.get('time', now):.0f}s ago, {where}"
        elif status or (cell_dir / cellmod.STATE_FILE).is_file():
            state = "interrupted"
            detail = (f"stopped near {step}; " if status else "") + "a rerun resumes it from its last checkpoint"
        rows.append({"cell": name, "state": state, "detail": detail})
    return rows


def status_command(args, console) -> int:
    """`ablate status RUN`: a table of the run's cells and their states."""
    from rich.markup import escape
    from rich.table import Table

    run_dir = Path(args.runs_dir) / args.run
    if not run_dir.is_dir():
        runs = Path(args.runs_dir)
        known = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
        raise AblateError(f"No run {args.run!r} in {args.runs_dir}/ (runs there: {', '.join(known) or 'none'}). "
                          f"Pass a run name (the spec's `name`) or --runs-dir.")
    rows = cell_states(run_dir)
    colours = {"done": "green", "failed": "red", "running": "cyan", "interrupted": "yellow"}
    active = store.is_locked(run_dir / store.RUN_LOCK)
    table = Table(title=f"cells of {args.run}" + ("" if active else " (no run active)"))
    for col in ("cell", "state", "detail"):
        table.add_column(col)
    for r in rows:
        colour = colours.get(r["state"], "dim")
        table.add_row(r["cell"], f"[{colour}]{r['state']}[/]", escape(r["detail"]))
    console.print(table)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "failed", "interrupted", "pending")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells")
    if counts["failed"]:
        console.print("failed cells are skipped by a rerun; `ablate run SPEC --retry-failed` reruns them")
    return 0
