"""Turns a validated spec into stages and cells, runs them in order with caching and resume,
then probes, verdicts, results.json and the report.

Cells are independent units: each is described by its resolved config and the keys of the
artifacts it reads, and writes only into its own directory.

Nothing is lost: `ablate run` on an existing run reuses every finished stage and cell (checked
against its checksums and the data it was built from) and continues an interrupted cell from its
last checkpoint; one process at a time may write a run directory; SIGINT/SIGTERM save at the next
step boundary and exit 130; a non-finite loss or gradient fails only its cell.
"""

from __future__ import annotations

import math
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablate import cells as cellmod
from ablate import meter, provenance, stages, store
from ablate.components import CellView, ObjectiveContext
from ablate.errors import AblateError, InputError, NumericalFault, PluginFault, RunFailed
from ablate.spec import Spec, base_name, cells_for, sweep_label
from ablate.verdict import rubric_text

RESULTS_SCHEMA_VERSION = 1
NO_TEACHER = "not needed (oracle from files)"

CONVENTIONS = {
    "content_gain": "content_gain = val_loss(shuffled-oracle cell) − val_loss(real-oracle cell), in nats: "
                    "POSITIVE when the real oracle content lowers the loss. The reference's Δ-diff is the "
                    "opposite sign (real − shuffled); convert before comparing with upstream numbers.",
    "w_align_drift": "w_align_drift = ‖W_align − W_align(init)‖_F / √(d/3), W_align(init) = 0. The reference's "
                     "'> 2× init' is undefined for a zero init (its §10.2), so the unit is the init W_align would "
                     "have had as a default nn.Linear(d, d): entries U(−1/√d, 1/√d), variance 1/(3d), so "
                     "E‖W‖_F² = d/3 and ‖W‖_F ≈ √(d/3) (13.0639 at d = 512). The zeb136/138/139 threshold 0.3 (‖W_align‖_F > "
                     "3.9192 at d = 512) is about 2× the drift of the CE-only router (ZEB-136: ‖W_align‖_F "
                     "1.9108 → 0.1463): '2× init' read as '2× the CE attractor's own drift', the comparison the "
                     "reference's findings made; ZEB-139's 1.3461 and 0.5786 read 0.1030 and 0.0443 (HOLD, as "
                     "recorded upstream).",
    "strong_result": "A strong result is a bound of its own in [combine] strong (reference §7.3: content_gain ≥ "
                     "0.005), never counted as a threshold crossing; the combination records it per cell.",
    "battery_rubric": rubric_text(),
    "cross_run_cos": "cross_run_cos = mean over positions of cos(z_r(real), z_r(shuffled)) on the raw router "
                     "logits (not probabilities, not centred), same validation tokens for both cells.",
    "alpha": "α = exp(log_alpha), the router's logit scale (added in logit space, not a probability mixture).",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AblateError("--device cuda was requested but torch sees no CUDA device. Use --device cpu or auto.")
    return torch.device(name)


class StopFlag:
    """SIGINT/SIGTERM set a flag: training saves at the next step boundary (or between evaluation
    batches) and the run stops with exit code 130. A second signal interrupts at once
    (KeyboardInterrupt): the stage being computed leaves nothing behind, finished work is kept."""

    def __init__(self):
        self.set = False
        self.signal = None

    def __call__(self) -> bool:
        return self.set

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set, self.signal = True, signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Interrupted(Exception):
    exit_code = 130


@dataclass
class RunPaths:
    run_dir: Path
    report: Path
    cache: Path

    @classmethod
    def of(cls, spec: Spec, root: Path = Path(".")) -> "RunPaths":
        return cls(root / spec.runs_dir / spec.name, root / spec.reports_dir / f"{spec.name}.md", root / spec.cache_dir)


@dataclass
class Experiment:
    spec: Spec
    registry: Any
    device: torch.device
    ui: Any
    command: str = ""
    root: Path = Path(".")
    fresh: bool = False
    paths: RunPaths = field(init=False)
    stop: StopFlag = field(default_factory=StopFlag)

    def __post_init__(self):
        self.paths = RunPaths.of(self.spec, self.root)
        self.stage_results: dict[str, stages.StageResult] = {}
        self.activity = "preparing the run"  # what the run is doing, for the message of a crash
        self.compile_cache: dict[str, int] = {}  # bytes of compiler artifacts loaded / saved (CUDA)

    # ----------------------------------------------------------------------- preflight

    def preflight(self):
        """Checks that need plugins but no heavy work: input files exist, the backbone checkpoint
        exists, the teacher is reachable, its vocabulary matches and its tokenizer maps ids to the
        same tokens as the corpus's (each when known before loading)."""
        corpus_cls = self.registry.get("corpus", self.spec.corpus.plugin)
        teacher_cls = self.registry.get("teacher", self.spec.teacher.plugin)
        self.corpus_params = corpus_cls.Params.model_validate(corpus_params(self.spec, corpus_cls))
        self.teacher = teacher_cls(teacher_cls.Params.model_validate(self.spec.teacher.params()))
        _check_paths(self.corpus_params, "corpus")
        _check_paths(self.teacher.params, "teacher")
        stages.check_backbone_checkpoint(self.spec)
        for name in self.registry.names("probe"):  # every probe runs: a name two plugins claim fails now,
            self.registry.get("probe", name)  # not after the cells have trained
        corpus = corpus_cls(self.corpus_params)
        vocab = corpus.known_vocab_size()
        if self.spec.oracle.source == "files":  # no teacher pass: the files are checked instead of the teacher
            from ablate import oracle_files

            oracle_files.check_headers(self.spec.oracle, vocab)
        elif vocab is not None:
            self.teacher.check(vocab)  # else the vocabulary is known only after tokenising: checked then
        self._check_tokenizers(corpus.tokenizer_file())  # again after tokenising
        return corpus_cls

    def _check_tokenizers(self, corpus_tokenizer) -> None:
        """Corpus vs teacher tokenizer; with an oracle from files the teacher only names the model the
        files came from, so a teacher that cannot be located here is no error."""
        from ablate import tokenizer_identity

        try:
            tokenizer_identity.check(corpus_tokenizer, self.teacher, self.spec.name)
        except InputError:
            if self.spec.oracle.source != "files":
                raise

    def stage_keys(self, corpus_cls) -> dict[str, str]:
        k_corpus = stages.corpus_key(corpus_cls, self.corpus_params)
        k_teacher = stages.teacher_key(self.teacher, k_corpus, self.spec.seed)
        vocab = corpus_cls(self.corpus_params).known_vocab_size()  # imported oracle files are checked against it
        return {"corpus": k_corpus, "backbone": stages.backbone_key(self.spec, k_corpus), "teacher": k_teacher,
                "oracle": stages.oracle_key(self.spec, k_teacher, k_corpus, vocab)}

    # --------------------------------------------------------------------------- plan

    def plan(self) -> list[dict]:
        """Every stage and cell with its key, whether it is cached and what would run (nothing is
        computed; checksums are verified)."""
        corpus_cls = self.preflight()
        keys = self.stage_keys(corpus_cls)
        cache = self.paths.cache
        upstream = {"corpus": [], "backbone": ["corpus"], "teacher": ["corpus"],
                    "oracle": [] if self.spec.oracle.source == "files" else ["teacher", "corpus"]}  # files: key = digest
        digests: dict[str, str | None] = {}  # the data each stage will have if it is rebuilt identically
        rebuilt: set[str] = set()
        rows = []
        for name, key in keys.items():
            path = cache / f"{name}-{key}"
            if name == "backbone" and self.spec.backbone.source == "checkpoint":
                digests[name] = key
                rows.append({"name": name, "key": key, "status": f"cached (checkpoint {self.spec.backbone.checkpoint})"})
                continue
            if name == "teacher" and self.spec.oracle.source == "files":
                digests[name] = None
                rows.append({"name": name, "key": "—", "status": NO_TEACHER})
                continue
            ok, why = stages.cache_status(path, {u: digests[u] for u in upstream[name]})
            digests[name] = store.content_digest(path)
            status = "cached" + _if_identical([u for u in upstream[name] if u in rebuilt]) if ok else f"would run ({why})"
            if not ok:
                rebuilt.add(name)
            rows.append({"name": name, "key": key, "status": status})

        cell_rows, done_cells = self._plan_cells(keys, digests, rebuilt)
        rows += cell_rows
        probe_key = self._probe_key(done_cells) if len(done_cells) == len(self.spec.cells) else None
        rows.append({"name": "probes", "key": probe_key or "—",
                     "status": "cached" if probe_key and self._cached_probes(probe_key) else "would run"})
        rows.append({"name": "verdicts, results.json, report", "key": "—", "status": "always rewritten (cheap)"})
        return rows

    def _plan_cells(self, keys, digests, rebuilt) -> tuple[list[dict], dict[str, Path]]:
        """Cell rows, and the directories of the cells that are complete. An input digest of None
        (an input to be rebuilt whose old data is unknown) matches whatever the cell recorded."""
        rows, done = [], {}
        for cell in self.spec.cells:
            key = self.cell_key(cell, keys)
            cell_dir = self.paths.run_dir / "cells" / cell.name
            recorded = cellmod.recorded_identity(cell_dir) or {}
            same = recorded.get("key") == key and all(
                digests[u] is None or recorded.get("inputs", {}).get(u) == digests[u] for u in ("backbone", "oracle"))
            waits_on = _if_identical([u for u in ("backbone", "oracle") if u in rebuilt])
            if same and store.is_done(cell_dir):
                status = "cached" + waits_on
                done[cell.name] = cell_dir
            elif same and (cell_dir / cellmod.STATE_FILE).is_file():
                status = "would resume from its last checkpoint" + waits_on
            else:
                status = "would run"
            rows.append({"name": f"cell {cell.name}", "key": key, "status": status})
        return rows, done

    # ---------------------------------------------------------------------------- run

    def run(self) -> dict:
        t_start = time.time()
        corpus_cls = self.preflight()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with store.RunLock(self.paths.run_dir), self.stop.installed():
                return self._run_locked(corpus_cls, t_start)
        except KeyboardInterrupt:
            self._mark_report_stale("it was interrupted")
            raise Interrupted() from None
        except Interrupted:
            self._mark_report_stale("it was interrupted")
            raise
        except AblateError as exc:
            self._mark_report_stale(f"it stopped with an error: {exc}")
            raise
        except Exception as exc:  # a bug or an environment failure: one paragraph, traceback in a log
            failure = self._crash(exc)
            self._mark_report_stale(f"it stopped with an unexpected {type(exc).__name__} while {self.activity}")
            raise failure from exc

    def _crash(self, exc: Exception) -> RunFailed:
        """The paragraph for an unexpected exception: where, what is kept, how to resume; the
        traceback goes to runs/<name>/logs/."""
        log = self.paths.run_dir / "logs" / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"while {self.activity}\n{self.command}\n\n"
                       + "".join(traceback.format_exception(exc)))
        done = [n for n in (c.name for c in self.spec.cells) if store.is_done(self.paths.run_dir / "cells" / n)]
        stages_kept = [n for n, r in self.stage_results.items() if r.key]
        kept = (f"stages kept in the cache: {', '.join(stages_kept) or 'none'}; finished cells kept: "
                f"{', '.join(done) or 'none'} (a cell that was training keeps its last checkpoint)")
        hint = _hint(exc)
        return RunFailed(
            f"ablate run {self.spec.name!r} stopped with an unexpected {type(exc).__name__} while {self.activity}: "
            f"{str(exc).strip() or '(no message)'}. {hint}{kept}. The traceback is in {log} (or rerun with --debug). "
            f"After fixing the cause, resume with: {self.command or 'the same ablate run command'}", str(log))

    def _mark_report_stale(self, why: str) -> None:
        """Put a banner at the top of an existing report this run could not replace."""
        from ablate.report import mark_stale

        try:
            mark_stale(self.paths.report, f"The run of {time.strftime('%Y-%m-%d %H:%M')} could not replace "
                                          f"this report: {why}. Its numbers are from an earlier run.")
        except OSError as exc:
            self.ui.warn(f"could not mark {self.paths.report} as stale ({exc})")

    def _run_locked(self, corpus_cls, t_start: float) -> dict:
        store.remove_temps(self.paths.run_dir)  # half-written files of a killed run
        store.remove_temps(self.paths.report.parent, self.paths.report.name)
        if self.fresh:
            self._clear_fresh()
        store.write_json(self.paths.run_dir / "spec.resolved.json", self.spec.model_dump(mode="json", by_alias=True))
        cache, fresh, device = self.paths.cache, self.fresh, self.device
        self.activity = "the corpus stage"
        with meter.measure(device) as use:
            r_corpus, corpus = stages.corpus_stage(cache, corpus_cls, self.corpus_params, self.ui, fresh)
        self._record(r_corpus, use, r_corpus.info["train_tokens"] + r_corpus.info["val_tokens"])
        imported = self.spec.oracle.source == "files"
        if not imported:
            self.teacher.check(corpus.vocab_size)
        self._check_tokenizers(corpus.tokenizer_path)  # a tokenizer known only after tokenising
        stages.check_lengths(self.spec, self.teacher, corpus)
        self.activity = "the backbone stage"
        with meter.measure(device) as use:
            r_bb = stages.backbone_stage(cache, self.spec, r_corpus, corpus, device, self.ui, fresh)
        self._record(r_bb, use, r_bb.info.get("train_tokens"))
        self.activity = "the teacher stage"
        with meter.measure(device) as use:
            if imported:  # the oracle comes from files: no teacher to prepare
                r_teacher, teacher_ctx = stages.StageResult("teacher", "", None, True, 0.0, {"skipped": "oracle from files"}), None
            else:
                r_teacher, teacher_ctx = stages.teacher_stage(cache, self.teacher, r_corpus, corpus, device,
                                                              self.spec.seed, self.ui, fresh)
        self._record(r_teacher, use, r_teacher.info.get("train_tokens"))
        self.activity = "the oracle stage"
        with meter.measure(device) as use:
            r_oracle, oracle = stages.oracle_stage(cache, self.spec, self.teacher, r_teacher, teacher_ctx, r_corpus,
                                                   corpus, device, self.ui, fresh)
        self._record(r_oracle, use, r_oracle.info.get("tokens"))
        variants = cellmod.oracle_variants(oracle, self.spec)

        with meter.measure(device) as use:
            cell_records = self._run_cells(corpus, r_bb, r_oracle, variants)
        all_cached = all(r.get("cached") for r in cell_records.values())
        trained = sum(r["outcome"].get("tokens") or 0 for r in cell_records.values()
                      if r.get("status") == "done" and not r.get("cached"))
        self._record(stages.StageResult("cells", "", self.paths.run_dir / "cells", all_cached, use.seconds,
                                        {"compile_cache": dict(self.compile_cache)}), use, trained)
        self.activity = "the probes"
        with meter.measure(device) as use:
            probe_metrics, pairs, failed_probes, probes_cached = self._run_probes(corpus, r_bb, r_oracle, variants,
                                                                                  cell_records)
        self._record(stages.StageResult("probes", "", self.paths.run_dir, probes_cached, use.seconds), use, None)
        self._check_stop()
        self.activity = "writing results.json and the report"
        results = self._results(corpus, r_teacher, r_oracle, oracle, cell_records, probe_metrics, pairs,
                                failed_probes, t_start)
        store.write_json(self.paths.run_dir / "results.json", results)
        from ablate.report import render_report

        render_report(results, self.paths.run_dir, self.paths.report)
        return results

    def _record(self, r: stages.StageResult, use: meter.Usage, tokens: int | None):
        """Keep a stage's result with what it cost (tokens count only when computed, not when cached)."""
        r.tokens = None if r.cached else tokens
        r.peaks = {k: v for k, v in use.as_dict().items() if k != "seconds"}
        self.stage_results[r.name] = r
        store.write_json(self.paths.run_dir / store.STAGES_FILE, {n: s.key for n, s in self.stage_results.items() if s.key})
        if r.key:
            self.ui.info(f"[green]✓[/] {r.name:<9} {'cached' if r.cached else 'computed'} in {r.seconds:6.1f}s  key {r.key}")
        self._check_stop()

    def _check_stop(self):
        if self.stop.set:
            raise Interrupted()

    def _clear_fresh(self):
        """--fresh: this run's cells and probes start over; its stages are recomputed (and replace
        their cache entries) as the run reaches them. Other runs' artifacts are untouched."""
        cells_dir = self.paths.run_dir / "cells"
        if cells_dir.exists():
            store.remove_tree(cells_dir, self.paths.run_dir)
        (self.paths.run_dir / "probes.json").unlink(missing_ok=True)

    # --------------------------------------------------------------------------- cells

    def cell_key(self, cell, stage_keys: dict[str, str]) -> str:
        inputs = {"backbone": stage_keys["backbone"], "oracle": stage_keys["oracle"]}
        return cellmod.cell_key(self.spec, cell, inputs, self.registry.get("objective", cell.objective.name))

    def _run_cells(self, corpus, r_bb, r_oracle, variants) -> dict[str, dict]:
        """Train (or reuse) every cell; with compilation on, around the compile cache."""
        from ablate import compile_cache, fastpath

        if not (cellmod.compile_cells(self.spec) and fastpath.enabled_for(self.device)):
            return self._run_cells_in_order(corpus, r_bb, r_oracle, variants)
        where = compile_cache.artifact_dir(self.paths.cache, self.device)
        self.compile_cache["loaded_bytes"], known = compile_cache.load(where, self.ui.warn)
        try:
            return self._run_cells_in_order(corpus, r_bb, r_oracle, variants)
        finally:  # also when stopped: what was compiled is kept
            try:
                self.compile_cache["saved_bytes"] = compile_cache.save(where, known)
            except Exception as exc:  # a cache: failing to write it must not fail the run
                self.ui.warn(f"could not save the compile cache to {where} ({type(exc).__name__}: {exc})")

    def _run_cells_in_order(self, corpus, r_bb, r_oracle, variants) -> dict[str, dict]:
        records: dict[str, dict] = {}
        keys = {"backbone": r_bb.key, "oracle": r_oracle.key}
        for cell in self.spec.cells:
            cell_dir = self.paths.run_dir / "cells" / cell.name
            ident = cellmod.identity(self.cell_key(cell, keys), {"backbone": r_bb.digest, "oracle": r_oracle.digest})
            if cellmod.is_complete(cell_dir, ident):
                (cell_dir / cellmod.STATE_FILE).unlink(missing_ok=True)  # killed between its marker and this delete
                records[cell.name] = self._load_record(cell, cell_dir, cached=True)
                self.ui.info(f"[green]✓[/] cell {cell.name} cached")
                continue
            self._check_stop()
            if cell_dir.exists() and store.read_marker(cell_dir) is not None:
                self.ui.warn(f"cell {cell.name}: its files are corrupt or it was trained on other inputs; recomputing it")
            records[cell.name] = self._train_cell(cell, cell_dir, ident, corpus, r_bb, variants)
        return records

    def _train_cell(self, cell, cell_dir: Path, ident: dict, corpus, r_bb, variants) -> dict:
        from ablate.train import train_cell

        self.activity = f"training cell {cell.name!r}"
        resume = cellmod.prepare_dir(cell_dir, ident, self.ui.warn)
        variant = variants[cell.oracle]
        student = cellmod.build_student(self.spec, cell, r_bb.path, corpus.vocab_size, variant.table, self.device)
        if resume is not None and (why := cellmod.state_mismatch(resume, student)) is not None:
            self.ui.warn(f"the resume state of cell {cell.name} does not fit its student ({why}); restarting it")
            (cell_dir / cellmod.STATE_FILE).unlink()
            resume = None
        obj_cls = self.registry.get("objective", cell.objective.name)
        try:
            objective = obj_cls(obj_cls.Params.model_validate(cell.objective.params()),
                                ObjectiveContext(corpus.vocab_size, corpus.frequencies))
        except Exception as exc:  # the plugin's own failure: this cell fails, the others run
            return self._plugin_failure(cell, PluginFault("objective", cell.objective.name, "in its constructor", exc),
                                        None)
        cfg = cellmod.train_config(self.spec, cell, self.device)
        sidecar = variant.sidecar.to(self.device) if obj_cls.needs_sidecar else None
        total = cfg.steps * cfg.batch * cfg.seq_len
        saved_step = [None if resume is None else int(resume["step"])]

        def save(state: dict) -> None:
            cellmod.save_state(cell_dir, state)
            saved_step[0] = int(state["step"])

        if resume is not None:
            self.ui.info(f"↻ cell {cell.name}: resuming from step {resume['step']}")
        try:
            with self.ui.stage(f"cell {cell.name}", total) as progress, meter.measure(self.device) as use:
                if resume is not None:
                    progress(resume["step"] * cfg.batch * cfg.seq_len)
                outcome = train_cell(student, objective, corpus.train, corpus.val, sidecar, cfg, self.device,
                                     progress=progress, should_stop=self.stop, resume_state=resume, save_state=save)
        except PluginFault as fault:
            return self._plugin_failure(cell, fault, saved_step[0])
        except NumericalFault as fault:
            state_file = cell_dir / cellmod.STATE_FILE
            kept = (f"last good checkpoint: step {saved_step[0]}" if saved_step[0] is not None
                    else "no checkpoint yet")
            self.ui.warn(f"cell {cell.name} stopped: non-finite {fault.what} at step {fault.step}; "
                         + (f"its last good checkpoint (step {saved_step[0]}) is kept in {state_file}"
                            if saved_step[0] is not None else "it had no checkpoint yet")
                         + ". The other cells still run.")
            return {"status": "failed", "error": f"non-finite {fault.what} at step {fault.step}; {kept}",
                    "step": fault.step, "checkpoint_step": saved_step[0]}
        if outcome.stopped_early:
            raise Interrupted()
        cellmod.write_outputs(cell_dir, student, outcome,
                              {"objective_formula": objective.formula(), "device": str(self.device),
                               "peak_gpu_allocated_gib": use.as_dict()["peak_gpu_allocated_gib"]})
        return self._load_record(cell, cell_dir, cached=False)

    def _plugin_failure(self, cell, fault: PluginFault, checkpoint_step: int | None) -> dict:
        """The record of a cell whose objective raised; its last checkpoint (if any) is kept."""
        kept = f"last good checkpoint: step {checkpoint_step}" if checkpoint_step is not None else "no checkpoint yet"
        self.ui.warn(f"cell {cell.name} failed: {fault}; {kept}. The other cells still run.")
        step = fault.where.removeprefix("at step ")
        return {"status": "failed", "error": f"{fault}; {kept}", "step": int(step) if step.isdigit() else None,
                "checkpoint_step": checkpoint_step}

    def _load_record(self, cell, cell_dir: Path, cached: bool) -> dict:
        outcome = store.read_json(cell_dir / "outcome.json")
        return {"status": "done", "cached": cached, "dir": cell_dir, "outcome": outcome,
                "evals": store.read_json(cell_dir / "evals.json"),
                "history": cellmod.read_history(cell_dir / "metrics.csv")}

    # -------------------------------------------------------------------------- probes

    def pairs(self) -> list[tuple[str, str]]:
        """(real, control) cells that differ only in the oracle variant (same router, objective, sweep)."""
        out = []
        by_setting: dict[str, dict[str, str]] = {}
        for c in self.spec.cells:
            setting = store.stable_hash({"router": c.router, "objective": c.objective.model_dump(), "sweep": sweep_label(c.name)})
            by_setting.setdefault(setting, {})[c.oracle] = c.name
        for group in by_setting.values():
            if "real" in group:
                out += [(group["real"], group[o]) for o in ("shuffled", "gaussian") if o in group]
        return out

    def _probe_batches(self, corpus, r_oracle) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from ablate.hashing import canonical_rows

        p = self.spec.probes
        seq = p.seq_len or self.spec.train.seq_len
        stages.require_tokens(corpus, seq, "probes")
        g = torch.Generator().manual_seed(p.seed)
        batches, rows = [], []
        for _ in range(p.batches):
            starts = torch.randint(0, corpus.val.numel() - seq, (p.batch,), generator=g)
            b = torch.stack([corpus.val[s:s + seq + 1] for s in starts.tolist()]).to(self.device)
            batches.append(b)
            rows.append(canonical_rows(b[:, :-1], self.spec.oracle.rows, self.spec.oracle.seeds[0]))
        return batches, rows

    def _probe_key(self, done_dirs: dict[str, Path]) -> str:
        """Key of the probe results: the probes' versions and settings and the content digests of
        the finished cells they read."""
        names = sorted(self.registry.names("probe"))
        modules = tuple(sorted({self.registry.get("probe", n).__module__ for n in names}))
        return stages.stage_key("probes", {"probes": names, "spec": self.spec.probes.model_dump()},
                                {name: store.content_digest(d) for name, d in done_dirs.items()}, modules)

    def _cached_probes(self, key: str) -> dict | None:
        try:
            cached = store.read_json(self.paths.run_dir / "probes.json")
        except (OSError, ValueError):
            return None
        return cached if isinstance(cached, dict) and cached.get("key") == key else None

    def _run_probes(self, corpus, r_bb, r_oracle, variants, records):
        """→ (per-cell metrics, pair results, failed probes, cached?). A probe that raises is that
        probe's failure (recorded with its error), not the run's; results with a failure are not
        cached, so the next run retries the probe."""
        done = [c for c in self.spec.cells if records.get(c.name, {}).get("status") == "done"]
        probe_names = sorted(self.registry.names("probe"))
        probe_key = self._probe_key({c.name: records[c.name]["dir"] for c in done})
        cached = self._cached_probes(probe_key)
        if cached is not None:
            self.ui.info("[green]✓[/] probes cached")
            return cached["cells"], cached["pairs"], [], True
        batches, rows = self._probe_batches(corpus, r_oracle)
        views: dict[str, CellView] = {}
        sidecars = {v: variants[v].sidecar.to(self.device) for v in {c.oracle for c in done}}  # one copy per variant
        for c in done:
            rec = records[c.name]
            student = cellmod.load_trained(self.spec, c, rec["dir"], r_bb.path, corpus.vocab_size,
                                           variants[c.oracle].table, self.device)
            views[c.name] = CellView(c.name, c.model_dump(mode="json"), student, rec["history"], rec["evals"], batches,
                                     rows, sidecars[c.oracle], self.device)
        cell_metrics: dict[str, dict[str, float]] = {name: {} for name in views}
        failures: list[dict] = []

        def attempt(probe_cls, *cells: CellView) -> dict[str, float]:
            name = probe_cls.name
            self.activity = f"probe {name!r} on {' vs '.join(v.name for v in cells)}"
            try:
                return _finite_only(probe_cls(probe_cls.Params()).run(*cells))
            except Exception as exc:  # the probe's own failure: its metrics are missing, the rest land
                error = f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"
                source = self.registry.components["probe"][name].source
                failures.append({"probe": name, "source": source, "cells": [v.name for v in cells], "error": error})
                self.ui.warn(f"probe {name!r} ({source}) failed on {' vs '.join(v.name for v in cells)}: {error}")
                return {}

        probes = [self.registry.get("probe", n) for n in probe_names]
        with self.ui.stage("probes", len(views) * len(probes), "probes") as progress:
            for probe_cls in probes:
                if probe_cls.scope == "cell":
                    for name, view in views.items():
                        cell_metrics[name].update(attempt(probe_cls, view))
                        progress(1)
        pair_results = []
        for real, control in self.pairs():
            if real in views and control in views:
                metrics: dict[str, float] = {}
                for probe_cls in probes:
                    if probe_cls.scope == "pair":
                        metrics.update(attempt(probe_cls, views[real], views[control]))
                pair_results.append({"real": real, "shuffled": control, "metrics": metrics})
        if not failures:
            store.write_json(self.paths.run_dir / "probes.json",
                             {"key": probe_key, "cells": cell_metrics, "pairs": pair_results})
        return cell_metrics, pair_results, failures, False

    # ------------------------------------------------------------------------- results

    def _results(self, corpus, r_teacher, r_oracle, oracle, records, cell_metrics, pairs, failed_probes,
                 t_start) -> dict:
        from ablate import verdict

        spec = self.spec
        metrics = {name: dict(m) for name, m in cell_metrics.items()}
        pairs = attribute_pairs(pairs, discriminated_pairs(spec))
        for pair in pairs:  # the attributed pair's metrics are the real cell's
            if pair["attributed"]:
                metrics.setdefault(pair["real"], {}).update(pair["metrics"])
        names = {"log_vocab": math.log(corpus.vocab_size), "vocab_size": float(corpus.vocab_size),
                 "rows": float(spec.oracle.rows), "log_rows": math.log(spec.oracle.rows),
                 "unigram_entropy": unigram_entropy(corpus.frequencies)}
        meanings = {}
        for probe in self.registry.components["probe"].values():
            meanings.update(probe.cls.metrics)

        thresholds = []
        for th in spec.thresholds:
            for cell in [c.name for name in th.cells for c in cells_for(spec, name)]:
                value = metrics.get(cell, {}).get(th.metric)
                thresholds.append(verdict.evaluate_spec_rule(th.name, th.metric, cell, value, th.break_if, names,
                                                             meanings.get(th.metric, "")))
        combination = {}
        strong_bounds = [(b, {c.name for n in b.cells for c in cells_for(spec, n)})
                         for b in spec.combine.strong_bounds(spec.thresholds)]
        for cell in spec.cells:
            own = [t for t in thresholds if t["cell"] == cell.name]
            strong = [verdict.strong_result(b.metric, cell.name, metrics.get(cell.name, {}).get(b.metric), b.strong_if,
                                            names) for b, cells in strong_bounds if cell.name in cells]
            if own or strong:
                combination[cell.name] = verdict.combine(own, spec.combine.soft_at, spec.combine.broken_at, strong)
        discriminator = []
        for real, shuf in discriminated_pairs(spec):
            if real not in combination or shuf not in combination:
                continue
            rl, sl = combination[real]["label"], combination[shuf]["label"]
            out = verdict.discriminate(rl == "broken", sl == "broken")
            discriminator.append({"real": real, "shuffled": shuf, "real_label": rl, "shuffled_label": sl, **out})

        cells_out = {}
        for cell in spec.cells:
            rec = records.get(cell.name, {"status": "skipped"})
            outcome = rec.get("outcome", {})
            cells_out[cell.name] = {
                "config": {"router": cell.router, "oracle": cell.oracle,
                           "objective": {"name": cell.objective.name, **cell.objective.params()},
                           "uses_sidecar": bool(self.registry.get("objective", cell.objective.name).needs_sidecar),
                           "base": base_name(cell.name), "sweep": sweep_label(cell.name)},
                "objective_formula": outcome.get("objective_formula", ""),
                "status": rec.get("status", "skipped"), "error": rec.get("error"), "cached": rec.get("cached", False),
                "failed_at_step": rec.get("step"), "checkpoint_step": rec.get("checkpoint_step"),
                "metrics": metrics.get(cell.name, {}),
                "metrics_csv": f"cells/{cell.name}/metrics.csv",
                "evals": rec.get("evals", []),
                "history": _thin(rec.get("history", []), 200),
                "seconds": outcome.get("seconds"), "tokens_per_s": outcome.get("tokens_per_s"),
                "peak_gpu_allocated_gib": outcome.get("peak_gpu_allocated_gib"), "compiled": outcome.get("compiled"),
            }
        results = {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "name": spec.name, "description": spec.description, "numerics": spec.numerics,
            "conventions": CONVENTIONS,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude={"profiles"}),
            "axes": spec.axes.model_dump(),
            "stages": {n: {"key": r.key, "cached": r.cached, "seconds": r.seconds, "tokens": r.tokens,
                           "tokens_per_s": meter.rate(r.tokens, r.seconds), **r.peaks, "info": stages.json_safe(r.info)}
                       for n, r in self.stage_results.items()},
            "teacher": stages.json_safe(r_teacher.info),
            "oracle": stages.json_safe(oracle.stats),
            "cells": cells_out, "pairs": pairs, "failed_probes": failed_probes,
            "thresholds": thresholds, "combination": combination, "discriminator": discriminator,
            "metric_meanings": meanings, "bound_names": names,
            "provenance": provenance.collect(self.registry, self.device, spec.seed, self.command, t_start,
                                             {n: r.seconds for n, r in self.stage_results.items()}),
        }
        if spec.expect is not None:
            from ablate.expect import check_expectations

            results["expectations"] = check_expectations(spec.expect, results, names)
        return results


def corpus_params(spec: Spec, corpus_cls) -> dict:
    """The corpus plugin's parameters from the spec; under numerics = "upstream" a corpus that
    splits one stream defaults to the reference's chunk-aligned validation split."""
    params = spec.corpus.params()
    if spec.numerics == "upstream" and "val_split" in corpus_cls.Params.model_fields:
        params.setdefault("val_split", "chunks")
    return params


def discriminated_pairs(spec: Spec) -> list[tuple[str, str]]:
    """(real, shuffled) cell names of every [[discriminator]] entry, sweeps expanded and matched
    by sweep label."""
    out = []
    for d in spec.discriminator:
        for real in cells_for(spec, d.real):
            label = sweep_label(real.name)
            shuf = next((c.name for c in cells_for(spec, d.shuffled) if sweep_label(c.name) == label), None)
            if shuf is not None:
                out.append((real.name, shuf))
    return out


def attribute_pairs(pairs: list[dict], discriminated: list[tuple[str, str]]) -> list[dict]:
    """Copies of `pairs` with `attributed` set: per real cell exactly one pair lends its metrics to
    the real cell (and so to thresholds and expectations): the pair a discriminator names, else
    the first (shuffled before Gaussian). The others stay readable under results["pairs"]."""
    chosen: dict[str, str] = {}
    for p in pairs:
        chosen.setdefault(p["real"], p["shuffled"])
    present = {(p["real"], p["shuffled"]) for p in pairs}
    for real, control in discriminated:
        if (real, control) in present:
            chosen[real] = control
    return [{**p, "attributed": chosen[p["real"]] == p["shuffled"]} for p in pairs]


def unigram_entropy(frequencies: torch.Tensor) -> float:
    """Entropy in nats of the corpus's unigram distribution (frequencies [V], counts)."""
    p = frequencies.double() / frequencies.double().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _check_paths(params, where: str) -> None:
    """InputError for any file or folder a plugin's parameters name that does not exist."""
    for name, value in params:
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(p, Path) and not p.exists():
                raise InputError(f"[{where}] {name} = {str(p)!r} does not exist. Fix the path in the spec "
                                 f"(relative paths are read from the directory you run ablate in).")


def _hint(exc: Exception) -> str:
    """A sentence on the likely fix of a known kind of failure, else ''."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return ("The GPU ran out of memory: lower train.batch or train.seq_len (or oracle.batch), or free the GPU "
                "of other processes. ")
    if "CUDA" in text or "cuda" in text:
        return ("A CUDA error leaves the process's GPU state unusable; the next run starts a fresh process. "
                "Rerun with CUDA_LAUNCH_BLOCKING=1 to find the failing kernel if it repeats. ")
    return ""


def _if_identical(upstream: list[str]) -> str:
    return f" if {' and '.join(upstream)} rebuild{'s' if len(upstream) == 1 else ''} with identical data" if upstream else ""


def _finite_only(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}


def _thin(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    picked = [rows[int(i * step)] for i in range(n)]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


def failed_cells(results: dict) -> list[str]:
    return [n for n, c in results["cells"].items() if c["status"] != "done"]


def unmet_expectations(results: dict) -> list[dict]:
    return [e for e in results.get("expectations", []) if not e["met"]]


def exit_code(results: dict) -> int:
    return 1 if failed_cells(results) or unmet_expectations(results) or results.get("failed_probes") else 0

