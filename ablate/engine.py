"""Turns a validated spec into stages and cells, runs them in order with caching and resume,
then probes, verdicts, results.json and the report.

Cells are independent units: each is described by its resolved config and the keys of the
artifacts it reads, and writes only into its own directory.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablate import cells as cellmod
from ablate import provenance, stages, store
from ablate.components import CellView, ObjectiveContext
from ablate.errors import AblateError, NumericalFault
from ablate.spec import Spec, base_name, cells_for, sweep_label

RESULTS_SCHEMA_VERSION = 1

CONVENTIONS = {
    "content_gain": "content_gain = val_loss(shuffled-oracle cell) − val_loss(real-oracle cell), in nats: "
                    "POSITIVE when the real oracle content lowers the loss. The reference's Δ-diff is the "
                    "opposite sign (real − shuffled); convert before comparing with upstream numbers.",
    "w_align_drift": "w_align_drift = ‖W_align − W_align(init)‖_F / √d. W_align starts at exactly zero, so "
                     "'2× init' is meaningless; instead the drift is measured against √d, the Frobenius norm of "
                     "a default-initialised d×d Linear (variance 1/fan_in). 1.0 = moved as far as a fresh "
                     "layer's whole size.",
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
    """SIGINT/SIGTERM set a flag; training saves at the next step boundary and returns."""

    def __init__(self):
        self.set = False
        self.signal = None

    def __call__(self) -> bool:
        return self.set

    @contextmanager
    def installed(self):
        def handler(signum, frame):
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

    # ----------------------------------------------------------------------- preflight

    def preflight(self):
        """Checks that need plugins but no heavy work: teacher reachable, vocab compatible."""
        corpus_cls = self.registry.get("corpus", self.spec.corpus.plugin)
        teacher_cls = self.registry.get("teacher", self.spec.teacher.plugin)
        self.corpus_params = corpus_cls.Params.model_validate(self.spec.corpus.params())
        self.teacher = teacher_cls(teacher_cls.Params.model_validate(self.spec.teacher.params()))
        vocab = getattr(self.corpus_params, "vocab_size", None)
        self.teacher.check(vocab)
        return corpus_cls

    # --------------------------------------------------------------------------- plan

    def plan(self) -> list[dict]:
        """Every stage and cell with its key and whether it is cached (nothing is computed)."""
        corpus_cls = self.preflight()
        cache = self.paths.cache
        k_corpus = stages.corpus_key(corpus_cls, self.corpus_params)
        k_bb = stages.backbone_key(self.spec, k_corpus)
        k_teacher = stages.teacher_key(self.teacher, k_corpus, self.spec.seed)
        k_oracle = stages.oracle_key(self.spec, k_teacher, k_corpus)
        rows = []
        for name, key in (("corpus", k_corpus), ("backbone", k_bb), ("teacher", k_teacher), ("oracle", k_oracle)):
            done = self.spec.backbone.source == "checkpoint" if name == "backbone" else store.is_done(cache / f"{name}-{key}")
            rows.append({"name": name, "key": key, "status": "cached" if done else "would run"})
        inputs = {"backbone": k_bb, "oracle": k_oracle}
        for cell in self.spec.cells:
            key = cellmod.cell_key(self.spec, cell, inputs)
            cell_dir = self.paths.run_dir / "cells" / cell.name
            status = "cached" if cellmod.is_complete(cell_dir, key) else (
                "would resume" if (cell_dir / "state.pt").is_file() and cellmod.same_key(cell_dir, key) else "would run")
            rows.append({"name": f"cell {cell.name}", "key": key, "status": status})
        rows.append({"name": "probes, verdicts, report", "key": "—", "status": "would run (cheap; probes cached per cell keys)"})
        return rows

    # ---------------------------------------------------------------------------- run

    def run(self) -> dict:
        t_start = time.time()
        corpus_cls = self.preflight()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        with store.RunLock(self.paths.run_dir), self.stop.installed():
            if self.fresh:
                self._clear_fresh()
            store.write_json(self.paths.run_dir / "spec.resolved.json", self.spec.model_dump(mode="json", by_alias=True))
            cache = self.paths.cache
            r_corpus, corpus = stages.corpus_stage(cache, corpus_cls, self.corpus_params, self.ui)
            self._record(r_corpus)
            stages.require_tokens(corpus, self.spec.train.seq_len, "train")
            r_bb = stages.backbone_stage(cache, self.spec, r_corpus, corpus, self.device, self.ui)
            self._record(r_bb)
            r_teacher, teacher_ctx = stages.teacher_stage(cache, self.teacher, r_corpus, corpus, self.device, self.spec.seed, self.ui)
            self._record(r_teacher)
            r_oracle, oracle = stages.oracle_stage(cache, self.spec, self.teacher, r_teacher, teacher_ctx, r_corpus, corpus,
                                                   self.device, self.ui)
            self._record(r_oracle)
            variants = cellmod.oracle_variants(oracle, self.spec)
            self._check_stop()

            t0 = time.perf_counter()
            cell_records = self._run_cells(corpus, r_bb, r_oracle, variants)
            self.stage_results["cells"] = stages.StageResult("cells", "", self.paths.run_dir / "cells", False,
                                                             time.perf_counter() - t0)
            t0 = time.perf_counter()
            probe_metrics, pairs = self._run_probes(corpus, r_bb, r_oracle, variants, cell_records)
            self.stage_results["probes"] = stages.StageResult("probes", "", self.paths.run_dir, False, time.perf_counter() - t0)
            results = self._results(corpus, r_teacher, r_oracle, oracle, cell_records, probe_metrics, pairs, t_start)
            store.write_json(self.paths.run_dir / "results.json", results)
            from ablate.report import render_report

            render_report(results, self.paths.run_dir, self.paths.report)
            return results

    def _record(self, r: stages.StageResult):
        self.stage_results[r.name] = r
        self.ui.info(f"[green]✓[/] {r.name:<9} {'cached' if r.cached else 'computed'} in {r.seconds:6.1f}s  key {r.key}")
        self._check_stop()

    def _check_stop(self):
        if self.stop.set:
            raise Interrupted()

    def _clear_fresh(self):
        import shutil

        cells_dir = self.paths.run_dir / "cells"
        if cells_dir.exists():
            shutil.rmtree(cells_dir)
        for stage in ("corpus", "backbone", "teacher", "oracle"):
            for p in self.paths.cache.glob(f"{stage}-*"):
                shutil.rmtree(p)
        (self.paths.run_dir / "probes.json").unlink(missing_ok=True)

    # --------------------------------------------------------------------------- cells

    def cell_keys(self, r_bb, r_oracle) -> dict[str, str]:
        inputs = {"backbone": r_bb.key, "oracle": r_oracle.key}
        return {c.name: cellmod.cell_key(self.spec, c, inputs) for c in self.spec.cells}

    def _run_cells(self, corpus, r_bb, r_oracle, variants) -> dict[str, dict]:
        from ablate.train import train_cell

        records: dict[str, dict] = {}
        keys = self.cell_keys(r_bb, r_oracle)
        for cell in self.spec.cells:
            cell_dir = self.paths.run_dir / "cells" / cell.name
            key = keys[cell.name]
            if cellmod.is_complete(cell_dir, key):
                records[cell.name] = self._load_record(cell, cell_dir, cached=True)
                self.ui.info(f"[green]✓[/] cell {cell.name} cached")
                continue
            resume = cellmod.prepare_dir(cell_dir, key)
            variant = variants[cell.oracle]
            student = cellmod.build_student(self.spec, cell, r_bb.path, corpus.vocab_size, variant.table, self.device)
            obj_cls = self.registry.get("objective", cell.objective.name)
            objective = obj_cls(obj_cls.Params.model_validate(cell.objective.params()),
                                ObjectiveContext(corpus.vocab_size, corpus.frequencies))
            cfg = cellmod.train_config(self.spec, cell, self.device)
            sidecar = variant.sidecar.to(self.device) if obj_cls.needs_sidecar else None
            total = cfg.steps * cfg.batch * cfg.seq_len
            if resume is not None:
                self.ui.info(f"↻ cell {cell.name}: resuming from step {resume['step']}")
            try:
                with self.ui.stage(f"cell {cell.name}", total) as progress:
                    if resume is not None:
                        progress(resume["step"] * cfg.batch * cfg.seq_len)
                    outcome = train_cell(student, objective, corpus.train, corpus.val, sidecar, cfg, self.device,
                                         progress=progress, should_stop=self.stop, resume_state=resume,
                                         save_state=lambda s, d=cell_dir: cellmod.save_state(d, s))
            except NumericalFault as fault:
                records[cell.name] = {"status": "failed", "error": str(fault), "step": fault.step}
                self.ui.warn(f"cell {cell.name} stopped: {fault}. Its last good checkpoint is kept in "
                             f"{cell_dir}/state.pt; the other cells still run.")
                continue
            if outcome.stopped_early:
                raise Interrupted()
            cellmod.write_outputs(cell_dir, student, outcome,
                                  {"objective_formula": objective.formula(), "device": str(self.device)})
            records[cell.name] = self._load_record(cell, cell_dir, cached=False)
        return records

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

    def _run_probes(self, corpus, r_bb, r_oracle, variants, records):
        done = [c for c in self.spec.cells if records.get(c.name, {}).get("status") == "done"]
        keys = self.cell_keys(r_bb, r_oracle)
        probe_names = sorted(self.registry.names("probe"))
        probe_key = stages.stage_key("probes", {"probes": probe_names, "spec": self.spec.probes.model_dump()},
                                     {c.name: keys[c.name] for c in done})
        cache_file = self.paths.run_dir / "probes.json"
        try:
            cached = store.read_json(cache_file)
            if cached.get("key") == probe_key:
                self.ui.info("[green]✓[/] probes cached")
                return cached["cells"], cached["pairs"]
        except (OSError, ValueError):
            pass
        batches, rows = self._probe_batches(corpus, r_oracle)
        views: dict[str, CellView] = {}
        for c in done:
            rec = records[c.name]
            student = cellmod.load_trained(self.spec, c, rec["dir"], r_bb.path, corpus.vocab_size,
                                           variants[c.oracle].table, self.device)
            views[c.name] = CellView(c.name, c.model_dump(mode="json"), student, rec["history"], rec["evals"], batches,
                                     rows, variants[c.oracle].sidecar.to(self.device), self.device)
        cell_metrics: dict[str, dict[str, float]] = {name: {} for name in views}
        pair_results = []
        probes = [self.registry.get("probe", n) for n in probe_names]
        with self.ui.stage("probes", len(views) * len(probes), "probes") as progress:
            for probe_cls in probes:
                probe = probe_cls(probe_cls.Params())
                if probe.scope == "cell":
                    for name, view in views.items():
                        cell_metrics[name].update(_finite_only(probe.run(view)))
                        progress(1)
        for real, control in self.pairs():
            if real in views and control in views:
                metrics: dict[str, float] = {}
                for probe_cls in probes:
                    if probe_cls.scope == "pair":
                        metrics.update(_finite_only(probe_cls(probe_cls.Params()).run(views[real], views[control])))
                pair_results.append({"real": real, "shuffled": control, "metrics": metrics})
        store.write_json(cache_file, {"key": probe_key, "cells": cell_metrics, "pairs": pair_results})
        return cell_metrics, pair_results

    # ------------------------------------------------------------------------- results

    def _results(self, corpus, r_teacher, r_oracle, oracle, records, cell_metrics, pairs, t_start) -> dict:
        from ablate import verdict

        spec = self.spec
        metrics = {name: dict(m) for name, m in cell_metrics.items()}
        for pair in pairs:  # pair metrics are attributed to the real cell of the pair
            metrics.setdefault(pair["real"], {}).update(pair["metrics"])
        names = {"log_vocab": math.log(corpus.vocab_size), "vocab_size": float(corpus.vocab_size),
                 "rows": float(spec.oracle.rows), "log_rows": math.log(spec.oracle.rows)}
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
        for cell in spec.cells:
            own = [t for t in thresholds if t["cell"] == cell.name]
            if own:
                combination[cell.name] = verdict.combine(own, spec.combine.soft_at, spec.combine.broken_at, spec.combine.strong)
        discriminator = []
        for d in spec.discriminator:
            for real in cells_for(spec, d.real):
                label = sweep_label(real.name)
                shuf = next((c.name for c in cells_for(spec, d.shuffled) if sweep_label(c.name) == label), None)
                if shuf is None or real.name not in combination or shuf not in combination:
                    continue
                rl, sl = combination[real.name]["label"], combination[shuf]["label"]
                out = verdict.discriminate(rl == "broken", sl == "broken")
                discriminator.append({"real": real.name, "shuffled": shuf, "real_label": rl, "shuffled_label": sl, **out})

        cells_out = {}
        for cell in spec.cells:
            rec = records.get(cell.name, {"status": "skipped"})
            outcome = rec.get("outcome", {})
            cells_out[cell.name] = {
                "config": {"router": cell.router, "oracle": cell.oracle,
                           "objective": {"name": cell.objective.name, **cell.objective.params()},
                           "base": base_name(cell.name), "sweep": sweep_label(cell.name)},
                "objective_formula": outcome.get("objective_formula", ""),
                "status": rec.get("status", "skipped"), "error": rec.get("error"), "cached": rec.get("cached", False),
                "metrics": metrics.get(cell.name, {}),
                "metrics_csv": f"cells/{cell.name}/metrics.csv",
                "evals": rec.get("evals", []),
                "history": _thin(rec.get("history", []), 200),
                "seconds": outcome.get("seconds"), "tokens_per_s": outcome.get("tokens_per_s"),
            }
        results = {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "name": spec.name, "description": spec.description,
            "conventions": CONVENTIONS,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude={"profiles"}),
            "axes": spec.axes.model_dump(),
            "stages": {n: {"key": r.key, "cached": r.cached, "seconds": r.seconds, "info": stages.json_safe(r.info)}
                       for n, r in self.stage_results.items()},
            "teacher": stages.json_safe(r_teacher.info),
            "oracle": stages.json_safe(oracle.stats),
            "cells": cells_out, "pairs": pairs,
            "thresholds": thresholds, "combination": combination, "discriminator": discriminator,
            "metric_meanings": meanings,
            "provenance": provenance.collect(self.registry, self.device, spec.seed, self.command, t_start,
                                             {n: r.seconds for n, r in self.stage_results.items()}),
        }
        if spec.expect is not None:
            from ablate.expect import check_expectations

            results["expectations"] = check_expectations(spec.expect, results, names)
        return results


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
    return 1 if failed_cells(results) or unmet_expectations(results) else 0

