"""Turns a validated spec into stages and cells, runs them in order with caching and resume,
then probes, verdicts, results.json and the report.

Each stage's artifact is cached by key (stages.py); each cell is a job (cell_job.py) handed to an
executor (executors.py); probes (probing.py), results (results.py), `ablate plan` (planning.py)
and what a failed run leaves behind (failures.py) live in their own modules. Nothing is lost: a
rerun reuses every finished stage and cell and continues an interrupted cell from its last
checkpoint; one process at a time may write a run directory; SIGINT/SIGTERM save at the next step
boundary and exit 130; a non-finite loss or a raising objective fails only its cell.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablate.training import cells as cellmod
from ablate.pipeline import events
from ablate.pipeline import failures
from ablate.pipeline import meter
from ablate.pipeline import planning
from ablate.pipeline import preflight
from ablate.pipeline import probing
from ablate.pipeline import stages
from ablate.pipeline import store
from ablate.pipeline.cell_job import cell_jobs
from ablate.errors import AblateError, Interrupted
from ablate.pipeline.executors import run_jobs
from ablate.report import provenance
from ablate.verdicts.results import build_results
from ablate.pipeline.run_control import RunPaths, StopFlag, resolve_device  # noqa: F401 (resolve_device: for the CLI)
from ablate.config.spec import Spec


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
        self.events: events.Dispatcher = events.NO_EVENTS  # the run's loggers, while it runs

    def preflight(self):
        return preflight.preflight(self)

    def check_tokenizers(self, corpus_tokenizer) -> dict:
        return preflight.check_tokenizers(self, corpus_tokenizer)

    def stage_keys(self, corpus_cls) -> dict[str, str]:
        k_corpus = stages.corpus_key(corpus_cls, self.corpus_params)
        k_teacher = stages.teacher_key(self.teacher, k_corpus, self.spec.seed)
        vocab = corpus_cls(self.corpus_params).known_vocab_size()  # imported oracle files are checked against it
        return {"corpus": k_corpus, "backbone": stages.backbone_key(self.spec, k_corpus), "teacher": k_teacher,
                "oracle": stages.oracle_key(self.spec, k_teacher, k_corpus, vocab)}

    def cell_key(self, cell, stage_keys: dict[str, str]) -> str:
        inputs = {"backbone": stage_keys["backbone"], "oracle": stage_keys["oracle"]}
        return cellmod.cell_key(self.spec, cell, inputs, self.registry.get("objective", cell.objective.name))

    def plan(self) -> list[dict]:
        return planning.plan(self)

    def run(self) -> dict:
        t_start = time.time()
        corpus_cls = self.preflight()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with store.RunLock(self.paths.run_dir), self.stop.installed(), self._loggers():
                return self._run_locked(corpus_cls, t_start)
        except (KeyboardInterrupt, Interrupted):
            failures.mark_report_stale(self, "it was interrupted")
            raise Interrupted() from None
        except AblateError as exc:
            failures.mark_report_stale(self, f"it stopped with an error: {exc}")
            raise
        except Exception as exc:  # a bug or an environment failure: one paragraph, traceback in a log
            failure = failures.crash(self, exc)
            failures.mark_report_stale(self, f"it stopped with an unexpected {type(exc).__name__} while {self.activity}")
            raise failure from exc

    def _run_locked(self, corpus_cls, t_start: float) -> dict:
        for directory in [self.paths.run_dir, *sorted((self.paths.run_dir / "cells").glob("*"))]:
            store.remove_temps(directory)  # half-written files of a killed run, finished cells' included
        store.remove_temps(self.paths.report.parent, self.paths.report.name)
        if self.fresh:
            self._clear_fresh()
        resolved = self.spec.model_dump(mode="json", by_alias=True)
        store.write_json(self.paths.run_dir / "spec.resolved.json", resolved)
        spec, device = self.spec, self.device
        ctx = stages.StageContext(self.paths.cache, spec, device, self.ui, self.fresh)
        if self.events:
            self.events(events.RunStarted(spec.name, str(self.paths.run_dir), resolved, provenance.collect(
                self.registry, device, spec.seed, self.command, t_start, {})))
        imported = spec.oracle.source == "files"
        with self._stage("corpus") as use:
            r_corpus, corpus = stages.corpus_stage(ctx, corpus_cls, self.corpus_params)
        self._record(r_corpus, use, r_corpus.info["train_tokens"] + r_corpus.info["val_tokens"])
        if not imported:
            self.teacher.check(corpus.vocab_size)
        self.check_tokenizers(corpus.tokenizer_path)  # a tokenizer known only after tokenising
        stages.check_lengths(spec, self.teacher, corpus)
        with self._stage("backbone") as use:
            r_bb = stages.backbone_stage(ctx, r_corpus, corpus)
        self._record(r_bb, use, r_bb.info.get("train_tokens"))
        with self._stage("teacher") as use:
            if imported:  # the oracle comes from files: no teacher to prepare
                r_teacher, teacher_ctx = stages.StageResult("teacher", "", None, True, 0.0, {"skipped": "oracle from files"}), None
            else:
                r_teacher, teacher_ctx = stages.teacher_stage(ctx, self.teacher, r_corpus, corpus)
        self._record(r_teacher, use, r_teacher.info.get("train_tokens"))
        with self._stage("oracle") as use:
            r_oracle, oracle = stages.oracle_stage(ctx, self.teacher, r_teacher, teacher_ctx, r_corpus, corpus)
        self._record(r_oracle, use, r_oracle.info.get("tokens"))
        variants = cellmod.oracle_variants(oracle, spec)
        jobs = cell_jobs(self, r_corpus, r_bb, r_oracle, corpus, variants)
        with meter.measure(device) as use:
            records = run_jobs(self, jobs)
        trained = sum(r["outcome"].get("tokens") or 0 for r in records.values() if r["status"] == "done" and not r["cached"])
        self._record(stages.StageResult("cells", "", self.paths.run_dir / "cells", all(r.get("cached") for r in records.values()),
                                        use.seconds, {"compile_cache": dict(self.compile_cache)}), use, trained)
        with self._stage("probes") as use:
            probed = probing.run_probes(self, corpus, r_bb, variants, records)
        self.events(events.ProbesFinished(*probed))
        self._record(stages.StageResult("probes", "", self.paths.run_dir, probed[-1], use.seconds), use, None)
        self.activity = "writing results.json and the report"
        results = build_results(self, corpus, r_teacher, oracle, records, *probed[:3], t_start)
        store.write_json(self.paths.run_dir / "results.json", results)
        from ablate.report.markdown import render_report

        render_report(results, self.paths.run_dir, self.paths.report)
        self.events(events.Verdicts({n: c["metrics"] for n, c in results["cells"].items()}, results["thresholds"],
                                    results["combination"], results["discriminator"], results.get("expectations", []),
                                    str(self.paths.run_dir / "results.json")))
        return results

    @contextmanager
    def _loggers(self):
        """The spec's loggers receive the run's events (ablate.pipeline.events) until it ends."""
        self.events = events.open_loggers(self.spec, self.registry, self.ui.warn)
        try:
            yield
        finally:
            self.events.close()
            self.events = events.NO_EVENTS

    def _stage(self, name: str):
        self.activity = f"the {name} stage" if name != "probes" else "the probes"
        return meter.measure(self.device)

    def _record(self, r: stages.StageResult, use: meter.Usage, tokens: int | None):
        """Keep a stage's result with what it cost (tokens count only when computed, not when cached)."""
        r.tokens = None if r.cached else tokens
        r.peaks = {k: v for k, v in use.as_dict().items() if k != "seconds"}
        self.stage_results[r.name] = r
        self.events(events.StageFinished(r.name, r.key, r.cached, r.seconds, r.tokens, dict(r.peaks)))
        store.write_json(self.paths.run_dir / store.STAGES_FILE, {n: s.key for n, s in self.stage_results.items() if s.key})
        if r.key:
            self.ui.info(f"[green]✓[/] {r.name:<9} {'cached' if r.cached else 'computed'} in {r.seconds:6.1f}s  key {r.key}")
        if self.stop.set:
            raise Interrupted()

    def _clear_fresh(self):
        """--fresh: this run's cells and probes start over; its stages are recomputed (and replace
        their cache entries) as the run reaches them. Other runs' artifacts are untouched."""
        cells_dir = self.paths.run_dir / "cells"
        if cells_dir.exists():
            store.remove_tree(cells_dir, self.paths.run_dir)
        (self.paths.run_dir / "probes.json").unlink(missing_ok=True)
