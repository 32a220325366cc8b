"""The probe contract: the StudentView a probe reads (implemented by the Student), metric metadata,
the plugin surface ablate.api, `[probes] use` / `[probes.<name>]` selection, and cache digests of a
component's own source."""

import ast
import importlib
import linecache
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ablate.api as api
from ablate.pipeline import probe_selection
from ablate.pipeline import stages
from ablate.api.components import METRIC_ROLES, CellView, Metric, MetricTable, Probe, StudentView
from ablate.errors import SpecError
from ablate.api.plugins import load_registry
from ablate.config.spec import load_spec
from probe_fixtures import BATCHES, LAYERS, make_student, make_table, outputs, view

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
EXAMPLE = ROOT / "plugins" / "examples" / "ablate-example-probe"


# ------------------------------------------------------------------------------ StudentView


def test_student_is_a_student_view_and_its_trace_is_the_traced_forward():
    student = make_student(make_table(0)).train()
    assert isinstance(student, StudentView)
    assert student.injection_layers == sorted(LAYERS)
    want = outputs(student)
    student.train()
    for batch, res in zip(BATCHES, want):
        trace = student.trace(batch[:, :-1])
        assert student.training and torch.is_grad_enabled()  # mode restored
        assert torch.equal(trace.logits, res.logits) and torch.equal(trace.router_logits, res.router_logits)
        assert torch.equal(trace.aligned, res.aligned) and trace.layers.keys() == res.traces.keys()
        for layer, t in trace.layers.items():
            r = res.traces[layer]
            for got, expected in [(t.h_in, r.h_in), (t.inj, r.inj), (t.out, r.xattn.out),
                                  (t.indices, r.xattn.indices), (t.sims, r.xattn.sims), (t.attn, r.xattn.attn)]:
                assert torch.equal(got, expected)
            again = student.inject(layer, t.h_in, student.table)  # recomputed on the own table: the same
            assert torch.equal(again.inj, t.inj) and torch.equal(again.indices, t.indices)
            assert not again.inj.requires_grad


def test_student_view_router_gate_lm_head_and_row_values():
    student = make_student(make_table(0))
    r = student.engram_skip_router
    state = student.router
    assert torch.equal(state.W_align, r.W_align.weight) and not state.W_align.requires_grad
    assert state.log_alpha == r.log_alpha.item() and state.alpha == r.alpha.item()
    assert make_student(make_table(0), router=False).router is None
    for layer in LAYERS:
        assert student.gate(layer) == math.tanh(student.engram_injections[str(layer)].gate.item())
    assert torch.equal(student.lm_head_weight, student.backbone.lm_head_weight)
    rows = torch.tensor([0, 5, 7])
    normed, values = student.row_values(LAYERS[0], rows)
    xattn = student.engram_injections[str(LAYERS[0])].xattn
    with torch.no_grad():
        assert torch.equal(normed, xattn.row_norm(student.table[rows]))
        assert torch.equal(values, xattn.W_v(normed))


def test_a_probe_runs_on_any_student_view():
    """A stand-in StudentView (no Student at all) is enough for a probe: the contract is the protocol."""
    from ablate_builtins.probes import Gates

    class Fake:
        injection_layers = [3, 7]
        table = torch.zeros(4, 2)
        lm_head_weight = torch.zeros(5, 2)
        router = None

        def gate(self, layer):
            return layer / 10

        def trace(self, tokens):
            raise AssertionError("not needed")

        def inject(self, layer, h_in, table):
            raise AssertionError("not needed")

        def row_values(self, layer, rows):
            raise AssertionError("not needed")

    fake = Fake()
    assert isinstance(fake, StudentView)
    cell = CellView("c", {}, fake, [], [], [], [], None, torch.device("cpu"))
    assert Gates(Gates.Params()).run(cell) == {"gate_L3": 0.3, "gate_L7": 0.7}


# ---------------------------------------------------------------------------- metric metadata


def test_metrics_declared_as_records_or_as_a_dict_read_the_same():
    class New(Probe):
        name = "new"
        metrics = (Metric("a_L{l}", "an a", "nats", "alphabet"), Metric("b", "a b"))

    class Old(Probe):  # the older form: name → meaning
        name = "old"
        metrics = {"c": "a c (unitless)"}

    assert isinstance(New.metrics, MetricTable) and list(New.metrics) == ["a_L{l}", "b"]
    assert dict(New.metrics) == {"a_L{l}": "an a", "b": "a b"}
    assert New.metrics.info["a_L{l}"].section == "alphabet" and New.metrics.info["b"].section == "new"
    assert dict(Old.metrics) == {"c": "a c (unitless)"}
    assert Old.metrics.info["c"] == Metric("c", "a c (unitless)", "", "old")
    assert probe_selection.metric_info([New, Old])["a_L{l}"] == {
        "meaning": "an a", "unit": "nats", "section": "alphabet", "role": None, "convention": ""}
    with pytest.raises(ValueError, match="unknown role"):
        Metric("x", "y", role="no_such_role")


def test_every_builtin_metric_has_a_unit_and_a_section_and_roles_are_declared_once():
    reg = load_registry()
    info = probe_selection.declared_metrics(reg.get("probe", n) for n in probe_selection.builtin_probe_names(reg))
    assert info and all(m.unit and m.section and m.meaning for m in info.values())
    roles = [m.role for m in info.values() if m.role]
    assert sorted(roles) == sorted(METRIC_ROLES)


def test_the_report_names_no_probe_metric():
    """The report package reads probe metrics through their metadata only: no declared metric name
    (nor the fixed part of a per-layer one) appears in its code as a string."""
    reg = load_registry()
    names = set(probe_selection.declared_metrics(reg.get("probe", n) for n in reg.names("probe")))
    # rows_sweep.py is a study of one pair metric (docs/calibration.md), not the findings report
    code = "\n".join(p.read_text() for p in sorted((ROOT / "ablate" / "report").glob("*.py")) if p.name != "rows_sweep.py")
    # metrics.csv / evals.json columns and the oracle's health record: read literally, not probe metrics
    not_probe = {"val_loss", "alpha", "w_align_norm", "kl", "log_vocab"}
    strings = {n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for name in names - not_probe:
        stem = name.replace("_L{l}", "_L")
        assert not any(stem in s for s in strings), name


# ----------------------------------------------------------------------------- plugin surface


def test_api_exports_the_plugin_surface():
    for name in ("hookimpl", "Params", "Component", "Corpus", "Teacher", "LoadedTeacher", "TeacherContext",
                 "TokenCorpus", "Objective", "ObjectiveBatch", "ObjectiveResult", "ObjectiveContext", "Probe",
                 "CellView", "StudentView", "Trace", "InjectionTrace", "Metric", "losses", "AblateError",
                 "InputError"):
        assert name in api.__all__ and hasattr(api, name), name
    assert all(hasattr(api, name) for name in api.__all__)


def test_builtin_plugins_import_nothing_from_ablate_but_the_api():
    package = ROOT / "plugins" / "ablate_builtins"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module == "ablate" or module.startswith("ablate."):
                    assert module == "ablate.api", f"{path.name} imports {module}"


# ------------------------------------------------------------------------------- selection


def probe_plugin(path: Path, name: str, metric: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        from pydantic import Field
        from ablate.api import Metric, Params, Probe, hookimpl

        class MineParams(Params):
            scale: float = Field(1.0, gt=0)

        class Mine(Probe):
            name = {name!r}
            Params = MineParams
            metrics = (Metric({metric!r}, "a constant", "unitless", "mine"),)
            def run(self, view):
                return {{{metric!r}: self.params.scale}}

        @hookimpl
        def ablate_probes(register):
            register(Mine)
    """))
    return path


def selection(sets, registry):
    spec = load_spec(DEMO, sets, "tiny", registry)
    return [(cls.name, params) for cls, params in probe_selection.selected_probes(spec, registry)]


def test_default_selection_is_the_builtins_and_a_plugin_probe_runs_only_when_listed(tmp_path):
    reg = load_registry([probe_plugin(tmp_path / "mine.py", "mine", "mine_value")])
    builtins = probe_selection.builtin_probe_names(reg)
    assert "mine" in reg.names("probe") and "mine" not in builtins
    assert {"gates", "router-fingerprint", "injection-battery"} <= set(builtins)
    assert [n for n, _ in selection([], reg)] == builtins
    chosen = selection(['probes.use=["builtins", "mine"]', "probes.mine={scale=2.5}"], reg)
    assert [n for n, _ in chosen] == [*builtins, "mine"] and chosen[-1][1].scale == 2.5
    chosen = selection(['probes.use=["mine", "router-fingerprint", "cross-run", "content-gain"]'], reg)
    assert [n for n, _ in chosen] == ["mine", "router-fingerprint", "cross-run", "content-gain"]
    battery = dict(selection(['probes.injection-battery={pairs=20}'], reg))["injection-battery"]
    assert battery.pairs == 20 and battery.table_seed == 42


def problems(sets, registry) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        load_spec(DEMO, sets, "tiny", registry)
    return dict(exc.value.problems)


def test_selection_errors_name_the_probe_and_the_fix(tmp_path):
    reg = load_registry([probe_plugin(tmp_path / "mine.py", "mine", "mine_value")])
    p = problems(['probes.use=["builtins", "mine", "nope"]'], reg)
    assert "Unknown probe plugin 'nope'" in p["probes.use[2]"]
    p = problems(['probes.use=["builtins", "mine"]', "probes.mine={scale=-1, bogus=1}"], reg)
    assert "greater than 0" in p["probes.mine.scale"]
    assert "unknown key" in p["probes.mine.bogus"] and "probe 'mine' accepts: scale" in p["probes.mine.bogus"]
    p = problems(["probes.mine={scale=2}"], reg)  # parameters for a probe the spec does not run
    assert "which does not run" in p["probes.mine"] and "Add 'mine' to [probes] use" in p["probes.mine"]
    p = problems(['probes.batchs=3'], reg)
    assert "'batchs'" in p["probes"]
    # a threshold on a metric no selected probe declares
    p = problems(['probes.use=["gates"]'], reg)
    assert "no probe produces metric 'alpha'" in p["thresholds[1].metric"]
    assert "probe 'router-fingerprint' declares it: add it to [probes] use" in p["thresholds[1].metric"]
    # two selected probes declaring one metric
    clash = load_registry([probe_plugin(tmp_path / "clash.py", "clash", "gate_L{l}")])
    p = problems(['probes.use=["builtins", "clash"]'], clash)
    assert "both declare metric 'gate_L{l}'" in p["probes.use"]


def test_a_conflicting_probe_fails_only_the_specs_that_select_it(tmp_path):
    a = probe_plugin(tmp_path / "a.py", "twice", "twice_value")
    b = probe_plugin(tmp_path / "b.py", "twice", "twice_value")
    reg = load_registry([a, b])
    assert selection([], reg)  # not selected: the spec is fine
    p = problems(['probes.use=["builtins", "twice"]'], reg)
    assert "'twice' is registered by more than one plugin" in p["probes.use[1]"]


def test_probe_key_config_carries_names_params_and_own_source_digests(tmp_path):
    reg = load_registry()
    spec = load_spec(DEMO, ["probes.injection-battery={pairs=20}"], "tiny", reg)
    config = probe_selection.probe_key_config(spec, probe_selection.selected_probes(spec, reg))
    by_name = {p["name"]: p for p in config["probes"]}
    assert by_name["injection-battery"]["params"] == {"table_seed": 42, "seed": 0, "pairs": 20}
    assert by_name["gates"]["code"] == stages.component_source_digest(reg.get("probe", "gates"))
    assert config["batches"] == {"batches": 1, "batch": 2, "seq_len": None, "seed": 0}


# ------------------------------------------------------------------------------ source digest

MODULE = '''
import math

EPS = {eps}


def helper(x):
    return x + EPS


def unrelated():
    return {unrelated}


class First:
    def run(self):
        return helper(math.pi) * {first}


class Second:
    def run(self):
        return unrelated()
'''


def digests(tmp_path, monkeypatch, **values) -> dict[str, str]:
    """Import MODULE (formatted with values) as one module name and digest its two classes."""
    name = "digest_probe_module"
    path = tmp_path / f"{name}.py"
    path.write_text(MODULE.format(**{"eps": 1e-6, "unrelated": 1, "first": 2, **values}))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    linecache.clearcache()
    importlib.invalidate_caches()
    stages._assignments.cache_clear()
    stages.code_version.cache_clear()
    module = importlib.import_module(name)
    return {cls: stages.component_source_digest(getattr(module, cls)) for cls in ("First", "Second")}


def test_a_component_digest_follows_its_own_code_not_its_module(tmp_path, monkeypatch):
    base = digests(tmp_path, monkeypatch)
    assert base == digests(tmp_path, monkeypatch)  # stable
    other = digests(tmp_path, monkeypatch, unrelated=3)  # only Second's helper changed
    assert other["First"] == base["First"] and other["Second"] != base["Second"]
    own = digests(tmp_path, monkeypatch, first=5)
    assert own["First"] != base["First"] and own["Second"] == base["Second"]
    constant = digests(tmp_path, monkeypatch, eps=1e-7)  # a constant First's helper reads
    assert constant["First"] != base["First"] and constant["Second"] == base["Second"]


def test_cell_corpus_and_teacher_keys_follow_their_components_own_code(tmp_path, monkeypatch):
    """The cache keys of cells, corpora and teachers hash the plugin class, not its module: editing
    a neighbour in the same file leaves them (and their cached results) alone."""
    from ablate.training import cells as cellmod

    spec = load_spec(ROOT / "specs" / "demo.toml", [], "tiny")
    inputs = {"backbone": "b", "oracle": "o"}

    def keys(**values):
        digests(tmp_path, monkeypatch, **values)
        first = sys.modules["digest_probe_module"].First
        return (cellmod.cell_key(spec, spec.cells[0], inputs, first),
                stages.component_stage_key("corpus", {}, {}, (first,)))

    base = keys()
    assert keys(unrelated=3) == base  # only Second's helper changed
    assert keys(first=5)[0] != base[0] and keys(first=5)[1] != base[1]


def test_builtin_digests_cover_what_they_call():
    from ablate_builtins import battery, objectives

    seen = []

    def record(sources):
        seen.append(set(sources))
        return "x"

    original = stages.store.stable_hash
    stages.store.stable_hash = record
    try:
        stages.component_source_digest(battery.InjectionBattery)
        stages.component_source_digest(objectives.KLCE)
    finally:
        stages.store.stable_hash = original
    assert {"ablate_builtins.battery:layer_battery", "ablate_builtins.probes:cosine",
            "ablate.oracle.build:gaussian_twin"} <= seen[0]
    assert not any(s.startswith("ablate_builtins.probes:RouterFingerprint") for s in seen[0])
    assert {"ablate.training.losses:cross_entropy", "ablate.training.losses:kl_rows"} <= seen[1]


# ---------------------------------------------------------------------------- the probe example


def test_the_guide_probe_example_is_the_example_package():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section = guide.split("## A complete example: a probe", 1)[1]
    code = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    assert code == (EXAMPLE / "ablate_example_probe" / "__init__.py").read_text()


def test_the_example_probe_against_a_recomputation(tmp_path):
    """Loaded as a --plugin file: top-k accuracy and injection RMS recomputed from the traced forwards."""
    plugin = tmp_path / "example_probe.py"
    plugin.write_text((EXAMPLE / "ablate_example_probe" / "__init__.py").read_text())
    cls = load_registry([plugin]).get("probe", "next-token-accuracy")
    student = make_student(make_table(0))
    out = cls(cls.Params(k=3)).run(view(student))
    hits = total = 0
    sq = {layer: [] for layer in LAYERS}
    for batch, res in zip(BATCHES, outputs(student)):
        for b in range(batch.shape[0]):
            for t in range(batch.shape[1] - 1):
                ranked = sorted(range(res.logits.shape[-1]), key=lambda v: -float(res.logits[b, t, v]))
                hits += int(batch[b, t + 1]) in ranked[:3]
                total += 1
        for layer in LAYERS:
            sq[layer].append(float(res.traces[layer].inj.double().pow(2).mean()))
    assert out["next_token_topk_acc"] == hits / total
    for layer in LAYERS:
        assert math.isclose(out[f"inj_rms_L{layer}"], math.sqrt(sum(sq[layer]) / len(sq[layer])), rel_tol=1e-5)
    with pytest.raises(Exception):
        cls.Params(k=0)
