"""The shared, cached stages: corpus → backbone → teacher → oracle.

Each stage's artifact lives in `<cache>/<stage>-<key>/`, where the key hashes the stage's
resolved config, its inputs' keys and the code version that matters. A directory is reused when
its marker is present, every file matches its checksum, and the content digests of the inputs it
was built from equal those of the current inputs; anything else is recomputed (only that stage:
a recomputed input with byte-identical data keeps its dependants). Loading checks every tensor's
shape and dtype.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ablate.pipeline import store
from ablate.api.components import TeacherContext, TokenCorpus
from ablate.errors import InputError

# The modules whose code computes each of ablate's own stages (plugins add their component's
# module): a stage's key includes the hash of their source and of every module of the same
# package they import, so changing that code recomputes the stage and nothing else.
CODE_ROOTS = {"corpus": (), "backbone": ("ablate.training.lm_pretrain", "ablate.model.checkpoint"), "teacher": (),
              "oracle": ("ablate.oracle.build",), "cell": ("ablate.training.train", "ablate.model.student"),
              "probes": ("ablate.model.student",)}
# Interfaces, errors and orchestration: they decide where results go, not what they are.
_NOT_COMPUTATION = {"ablate", "ablate.errors", "ablate.api.components", "ablate.pipeline.store", "ablate.pipeline.stages", "ablate.training.cells",
                    "ablate.pipeline.engine", "ablate.pipeline.ui", "ablate.api.plugins", "ablate.api.hookspecs"}


@dataclass
class StageContext:
    """What every stage reads besides its inputs: the cache directory, the validated spec, the
    device, the UI and whether --fresh asked to recompute."""

    cache: Path
    spec: Any
    device: Any
    ui: Any
    fresh: bool = False


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # content digest of the artifact's data (what dependants were built from)
    tokens: int | None = None  # tokens this run's computation processed (None when cached or not counted)
    peaks: dict[str, float | None] = field(default_factory=dict)  # peak GPU GiB, from meter.Usage


@functools.lru_cache(maxsize=None)
def code_version(*modules: str) -> str:
    """Hash of the source of `modules` and of every module of their packages (or of ablate)
    they import, followed recursively (function-level and relative imports included)."""
    sources: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in sources or name in _NOT_COMPUTATION:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # `from pkg.mod import Class` also proposes pkg.mod.Class
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        text = Path(spec.origin).read_bytes()
        sources[name] = hashlib.sha256(text).hexdigest()
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        roots = {"ablate", name.split(".")[0]}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level
                        else node.module or "")
                found = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            todo += [m for m in found if m.split(".")[0] in roots]
    return store.stable_hash(sources)


@functools.lru_cache(maxsize=None)
def _assignments(module: str) -> dict[str, str]:
    """A module's top-level `NAME = …` statements as written, by name."""
    import ast

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return {}
    text = Path(spec.origin).read_text()
    out = {}
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                out[target.id] = ast.get_source_segment(text, node) or ""
    return out


def _assignment(module: str, name: str) -> str | None:
    try:
        return _assignments(module).get(name)
    except (ImportError, ValueError, OSError, SyntaxError):
        return None


def _plain(value: Any) -> bool:
    """A constant whose repr is its value in every process (no object addresses, no set order)."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, bytes, type(None)))


def stage_key(stage: str, config: Any, inputs: dict[str, str], components: tuple[str, ...] = ()) -> str:
    """Hash of the stage's normalised config, its inputs' keys and the code that computes it (the
    stage's CODE_ROOTS plus `components`, the modules of the plugin classes it runs)."""
    return store.stable_hash({"stage": stage, "code": code_version(*CODE_ROOTS[stage], *components),
                              "config": config, "inputs": inputs})


def component_stage_key(stage: str, config: Any, inputs: dict[str, str], classes: tuple[type, ...] = ()) -> str:
    """stage_key with the plugin classes' own code (component_source_digest) in place of their
    whole modules: editing one probe (or objective) leaves the others' results cached."""
    return store.stable_hash({"stage": stage, "code": code_version(*CODE_ROOTS[stage]),
                              "components": {f"{c.__module__}.{c.__qualname__}": component_source_digest(c)
                                             for c in classes},
                              "config": config, "inputs": inputs})


def component_source_digest(cls: type) -> str:
    """Hash of a component class's own source and of what it names, followed recursively: its
    Params, base classes, and the functions, classes and plain constants of its own package or of
    ablate (interfaces excepted) that it refers to, through `from x import f` or `module.f`. Not
    the rest of its module. Where a source cannot be read, that module's code_version stands in."""
    import ast
    import inspect
    import sys
    import textwrap

    roots = {cls.__module__.split(".")[0], "ablate"}
    skip = _NOT_COMPUTATION | {"ablate.api"}
    sources: dict[str, str] = {}

    def followed(module: str) -> bool:
        return module.split(".")[0] in roots and module not in skip

    todo: list[Any] = [cls, getattr(cls, "Params", None)]
    while todo:
        obj = todo.pop()
        module = getattr(obj, "__module__", None) or ""
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not followed(module):
            continue
        key = f"{module}:{obj.__qualname__}"
        if key in sources:
            continue
        try:
            text = textwrap.dedent(inspect.getsource(obj))
            tree = ast.parse(text)
        except (OSError, TypeError, SyntaxError):
            sources[key] = code_version(module)
            continue
        sources[key] = hashlib.sha256(text.encode()).hexdigest()
        namespace = vars(sys.modules[module]) if module in sys.modules else {}
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if id(node) in inner:  # part of a dotted name, resolved from its outermost node
                continue
            chain: list[str] = []
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            if not isinstance(node, ast.Name) or node.id not in namespace:
                continue
            value, owner, name = namespace[node.id], module, node.id
            for attr in chain:  # module.function: walk the dotted name while it stays in modules
                if not inspect.ismodule(value) or not hasattr(value, attr):
                    break
                value, owner, name = getattr(value, attr), value.__name__, attr
            if inspect.ismodule(value):
                if followed(value.__name__):
                    sources[value.__name__] = code_version(value.__name__)
            elif inspect.isclass(value) or inspect.isfunction(value):
                todo.append(value)
            elif _plain(value) and followed(owner):  # a constant: its assignment as written, else its value
                sources[f"{owner}:{name}"] = _assignment(owner, name) or repr(value)
    return store.stable_hash(sources)


def cache_status(path: Path, inputs: dict[str, str | None]) -> tuple[bool, str]:
    """(reusable, why not): a complete, uncorrupted artifact built from inputs with these
    content digests (None = that input is not built yet, so the match is unknown)."""
    if not path.exists():
        return False, "not built"
    bad = store.corrupt_files(path)
    if bad:
        return False, f"incomplete or corrupt ({', '.join(bad)})"
    recorded = store.marker_inputs(path)
    changed = sorted(k for k, d in inputs.items() if d is not None and recorded.get(k) != d)
    if changed:
        return False, f"built from a different {' and '.join(changed)} than the current one"
    return True, ""


def build_or_reuse(cache: Path, stage: str, key: str, inputs: dict[str, str], ui, fresh: bool,
                   build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Reuse `<cache>/<stage>-<key>` when cache_status allows (and not fresh); otherwise run
    build(tmp_dir) under the entry's lock, write the marker last and rename into place."""
    path = cache / f"{stage}-{key}"
    with store.stage_lock(cache, path.name, ui.info):
        ok, why = cache_status(path, inputs)
        if ok and not fresh:
            return path, True
        if path.exists() and not ok:
            ui.warn(f"{stage} artifact {path.name} is {why}; recomputing that stage")
        store.remove_temps(cache, path.name)  # a killed run's half-written attempt
        with store.staging(path) as tmp:
            build(tmp)
            store.mark_done(tmp, inputs)
    return path, False


def _timed(name, key, path, cached, t0, info, digest) -> StageResult:
    return StageResult(name, key, path, cached, time.perf_counter() - t0, info, digest)


# ------------------------------------------------------------------------------------ corpus


def corpus_key(corpus_cls, params) -> str:
    return component_stage_key("corpus", {"plugin": corpus_cls.name, "params": params.model_dump(mode="json")}, {},
                               (corpus_cls,))


def corpus_stage(ctx: StageContext, corpus_cls, params) -> tuple[StageResult, TokenCorpus]:
    cache, ui, fresh = ctx.cache, ctx.ui, ctx.fresh
    t0 = time.perf_counter()
    key = corpus_key(corpus_cls, params)

    def build(tmp: Path) -> None:
        with ui.stage("corpus", None, "docs") as progress:
            corpus = corpus_cls(params).load(tmp, progress)
        _check_corpus(corpus, corpus_cls.name)
        freq = torch.bincount(corpus.train.long(), minlength=corpus.vocab_size).to(torch.float64)
        save_file({"tokens": corpus.train.to(torch.int64).contiguous(), "frequencies": freq}, tmp / "train.safetensors")
        save_file({"tokens": corpus.val.to(torch.int64).contiguous()}, tmp / "val.safetensors")
        tok = None
        if corpus.tokenizer_path is not None:
            tok = "tokenizer.json"
            if Path(corpus.tokenizer_path).resolve() != (tmp / tok).resolve():
                shutil.copyfile(corpus.tokenizer_path, tmp / tok)
        store.write_json(tmp / "meta.json", {"vocab_size": corpus.vocab_size, "eos_id": corpus.eos_id,
                                             "tokenizer": tok, "info": corpus.info})

    path, cached = build_or_reuse(cache, "corpus", key, {}, ui, fresh, build)
    corpus = load_corpus(path)
    info = {"vocab_size": corpus.vocab_size, "train_tokens": int(corpus.train.numel()),
            "val_tokens": int(corpus.val.numel()), **corpus.info}
    return _timed("corpus", key, path, cached, t0, info, store.content_digest(path)), corpus


def _check_corpus(corpus: TokenCorpus, name: str) -> None:
    if corpus.train.numel() == 0 or corpus.val.numel() == 0:
        raise InputError(f"Corpus plugin {name!r} produced an empty train or validation split "
                         f"({corpus.train.numel()} / {corpus.val.numel()} tokens). Point it at more text "
                         f"or lower val_fraction.")
    top = int(max(corpus.train.max(), corpus.val.max()))
    if top >= corpus.vocab_size or int(min(corpus.train.min(), corpus.val.min())) < 0:
        raise InputError(f"Corpus plugin {name!r} produced token id {top} outside its vocabulary of "
                         f"{corpus.vocab_size}. Fix the corpus's vocab_size or its tokenizer.")


def load_corpus(path: Path) -> TokenCorpus:
    """Read a corpus artifact, checking every tensor's shape and dtype."""
    meta = store.read_json(path / "meta.json")
    train = load_file(path / "train.safetensors")
    val = load_file(path / "val.safetensors")
    vocab = meta["vocab_size"]
    for tensors, name, file in ((train, "tokens", "train.safetensors"), (train, "frequencies", "train.safetensors"),
                                (val, "tokens", "val.safetensors")):
        if name not in tensors:
            raise InputError(f"{path / file} has no tensor {name!r}; delete {path} and run again to recompute it.")
    store.check_tensor(train["tokens"], "tokens", (None,), torch.int64, path / "train.safetensors")
    store.check_tensor(train["frequencies"], "frequencies", (vocab,), torch.float64, path / "train.safetensors")
    store.check_tensor(val["tokens"], "tokens", (None,), torch.int64, path / "val.safetensors")
    corpus = TokenCorpus(train=train["tokens"], val=val["tokens"], vocab_size=vocab,
                         eos_id=meta["eos_id"], tokenizer_path=path / meta["tokenizer"] if meta["tokenizer"] else None,
                         info=meta["info"])
    corpus.info = {**meta["info"]}
    corpus.frequencies = train["frequencies"]  # [V] float64 counts
    return corpus


def require_tokens(corpus: TokenCorpus, seq_len: int, what: str, splits: tuple[str, ...] = ("train", "validation")
                   ) -> None:
    streams = {"train": corpus.train, "validation": corpus.val}
    for split in splits:
        if streams[split].numel() < seq_len + 1:
            raise InputError(f"{what} seq_len {seq_len} is longer than the corpus's {split} split "
                             f"({streams[split].numel()} tokens). Lower {what}.seq_len or use a larger corpus.")


def check_lengths(spec, teacher, corpus: TokenCorpus) -> None:
    """Every window length the run will draw fits the corpus (checked before any training)."""
    require_tokens(corpus, spec.train.seq_len, "train")
    require_tokens(corpus, spec.probes.seq_len or spec.train.seq_len, "probes")
    require_tokens(corpus, spec.oracle.seq_len, "oracle", ("train",))
    if spec.backbone.source == "pretrain":
        require_tokens(corpus, spec.backbone.pretrain.seq_len, "backbone.pretrain", ("train",))
    teacher_seq = getattr(teacher.params, "seq_len", None)
    if isinstance(teacher_seq, int):
        require_tokens(corpus, teacher_seq, "teacher", ("train",))


# ---------------------------------------------------------------------------------- backbone


def backbone_config(spec, vocab_size: int):
    from ablate.model.backbone import BackboneConfig

    return BackboneConfig(vocab_size=vocab_size, **spec.backbone.architecture())


def backbone_key(spec, corpus_key_: str) -> str:
    bb = spec.backbone
    if bb.source == "checkpoint":
        src = Path(bb.checkpoint)
        digest = store.file_digest(src) if src.is_file() else f"missing:{src}"
        return stage_key("backbone", {"checkpoint": digest, "arch": bb.architecture()}, {"corpus": corpus_key_})
    return stage_key("backbone", {"arch": bb.architecture(), "pretrain": bb.pretrain.model_dump()}, {"corpus": corpus_key_})


def check_backbone_checkpoint(spec) -> None:
    """The checkpoint exists and its format is known; a reference checkpoint.pt's pickle is safe to read
    and its stored config matches [backbone] (no weights read: backbone_stage checks every tensor)."""
    if spec.backbone.source != "checkpoint":
        return
    if not Path(spec.backbone.checkpoint).is_file():
        raise InputError(f"Backbone checkpoint {spec.backbone.checkpoint} does not exist. Set [backbone] checkpoint to "
                         f"a safetensors file written by ablate (or any file with the backbone's tensor names), or the "
                         f'reference\'s checkpoint.pt / model_step_N.safetensors, or use source = "pretrain" to train one.')
    from ablate.model.reference_import import check_reference

    check_reference(spec.backbone.checkpoint, spec.backbone.architecture())


def backbone_stage(ctx: StageContext, corpus_stage_: StageResult, corpus: TokenCorpus) -> StageResult:
    from ablate.training.lm_pretrain import pretrain_lm
    from ablate.model.backbone import Backbone
    from ablate.model.checkpoint import checkpoint_format, load_backbone, save_backbone

    cache, spec, device, ui, fresh = ctx.cache, ctx.spec, ctx.device, ctx.ui, ctx.fresh
    t0 = time.perf_counter()
    config = backbone_config(spec, corpus.vocab_size)
    bb = spec.backbone
    key = backbone_key(spec, corpus_stage_.key)
    if bb.source == "checkpoint":
        check_backbone_checkpoint(spec)
        src = Path(bb.checkpoint)
        if checkpoint_format(src) == "ablate":
            load_backbone(src, expected=config)  # strict accounting and architecture check, fails early
            return _timed("backbone", key, src, True, t0, {"source": str(src)}, key)

    def import_reference(tmp: Path) -> None:  # the reference's checkpoint.pt / model_step_N.safetensors, once
        from ablate.model.reference_import import convert_checkpoint

        report = convert_checkpoint(bb.checkpoint, tmp / "backbone.safetensors", expected=config)
        ui.info("imported backbone: " + "; ".join(report.lines()))
        store.write_json(tmp / "info.json", report.to_info())

    def build(tmp: Path) -> None:
        torch.manual_seed(bb.pretrain.seed)
        model = Backbone(config).to(device)
        total = bb.pretrain.steps * bb.pretrain.batch * bb.pretrain.seq_len
        with ui.stage("backbone pretrain", total) as progress:
            stats = pretrain_lm(lambda x: model.logits(model(x)), model.parameters(), corpus.train, corpus.val,
                                steps=bb.pretrain.steps, batch=bb.pretrain.batch, seq_len=bb.pretrain.seq_len,
                                lr=bb.pretrain.lr, warmup=bb.pretrain.warmup, seed=bb.pretrain.seed,
                                device=device, progress=progress, name="backbone pretraining",
                                lr_key="backbone.pretrain.lr")
        save_backbone(model.cpu(), tmp / "backbone.safetensors")
        store.write_json(tmp / "info.json", {**stats, "ln_vocab": math.log(corpus.vocab_size)})

    make = import_reference if bb.source == "checkpoint" else build
    path, cached = build_or_reuse(cache, "backbone", key, {"corpus": corpus_stage_.digest}, ui, fresh, make)
    info = store.read_json(path / "info.json")
    digest = key if bb.source == "checkpoint" else store.content_digest(path)  # a checkpoint's: its key, as plan() has it
    return _timed("backbone", key, path / "backbone.safetensors", cached, t0, info, digest)


# ----------------------------------------------------------------------------------- teacher


def teacher_key(teacher, corpus_key_: str, seed: int) -> str:
    params = teacher.params.model_dump(mode="json", exclude={"tokenizer_mismatch"})  # a check, not the teacher
    config = {"plugin": teacher.name, "params": params, "seed": seed}
    return component_stage_key("teacher", config, {"corpus": corpus_key_}, (type(teacher),))


def teacher_stage(ctx: StageContext, teacher, corpus_stage_: StageResult, corpus: TokenCorpus):
    """Prepare (e.g. train and save) the teacher; returns the stage result and a context for load()."""
    cache, device, seed, ui, fresh = ctx.cache, ctx.device, ctx.spec.seed, ctx.ui, ctx.fresh
    t0 = time.perf_counter()
    key = teacher_key(teacher, corpus_stage_.key, seed)

    def build(tmp: Path) -> None:
        with ui.stage(f"teacher ({teacher.name})", None) as progress:
            info = teacher.prepare(TeacherContext(corpus, tmp, device, seed, progress))
        store.write_json(tmp / "info.json", info or {})

    path, cached = build_or_reuse(cache, "teacher", key, {"corpus": corpus_stage_.digest}, ui, fresh, build)
    ctx = TeacherContext(corpus, path, device, seed)
    return _timed("teacher", key, path, cached, t0, store.read_json(path / "info.json"), store.content_digest(path)), ctx


# ------------------------------------------------------------------------------------ oracle


def oracle_config(spec):
    from ablate.oracle.build import OracleConfig

    return OracleConfig(**spec.oracle.model_dump(), numerics=spec.numerics)


_ORACLE_FILE_FIELDS = {"source", "table", "sidecar", "stats", "shuffled_table", "shuffled_sidecar"}


def oracle_key(spec, teacher_key_: str, corpus_key_: str, vocab: int | None = None) -> str:
    """A computed oracle: its config and the teacher's and corpus's keys. An imported one
    (source = "files", ablate.oracle.files): its config and the sha256 of the files' bytes, no
    inputs; the files' headers are checked first against the spec and `vocab` (None = unknown)."""
    # checks of the artifact, and the file fields (absent from keys of oracles computed before they existed)
    config = spec.oracle.model_dump(exclude={"teacher_max_ce", "teacher_health", *_ORACLE_FILE_FIELDS})
    if spec.oracle.source == "files":
        from ablate.oracle import files as oracle_files

        hashes = oracle_files.digests(spec.oracle)
        oracle_files.check_headers(spec.oracle, vocab)
        return stage_key("oracle", {**config, "source": "files", "files": hashes}, {}, ("ablate.oracle.files",))
    if spec.numerics != "ablate":  # only then: oracles built before the field existed keep their keys
        config["numerics"] = spec.numerics
    for control_seed in CONTROL_SEEDS:  # the controls are drawn from the loaded oracle: part of the cells' keys
        del config[control_seed]
    return stage_key("oracle", config, {"teacher": teacher_key_, "corpus": corpus_key_})


CONTROL_SEEDS = ("shuffle_seed", "gaussian_seed")


def oracle_stage(ctx: StageContext, teacher, teacher_stage_: StageResult, teacher_ctx, corpus_stage_: StageResult,
                 corpus: TokenCorpus):
    cache, spec, device, ui, fresh = ctx.cache, ctx.spec, ctx.device, ctx.ui, ctx.fresh
    from ablate.oracle.build import SIDECAR_FILE, TABLE_FILE, build_oracle, load_oracle, save_oracle

    t0 = time.perf_counter()
    cfg = oracle_config(spec)
    files = spec.oracle.source == "files"
    key = oracle_key(spec, teacher_stage_.key, corpus_stage_.key, corpus.vocab_size)

    def import_files(tmp: Path) -> None:  # the reference's oracle files, checked in full, once per content
        from ablate.oracle.files import import_oracle

        with ui.stage("oracle import", None):
            save_oracle(import_oracle(spec.oracle, corpus.vocab_size), tmp)

    def build(tmp: Path) -> None:
        require_tokens(corpus, cfg.seq_len, "oracle", ("train",))
        loaded = teacher.load(teacher_ctx)
        if loaded.vocab_size != corpus.vocab_size:
            raise InputError(f"Teacher {teacher.name!r} has a vocabulary of {loaded.vocab_size} tokens but the corpus and "
                             f"backbone use {corpus.vocab_size}. Use a teacher trained with the corpus's tokenizer.")
        n_tokens = (corpus.train.numel() // cfg.seq_len) * cfg.seq_len
        if cfg.max_tokens:
            n_tokens = min(n_tokens, cfg.max_tokens)
        with ui.stage("oracle pass", n_tokens) as progress:
            oracle = build_oracle(loaded, corpus.train, cfg, device, progress)
        save_oracle(oracle, tmp)

    inputs = {} if files else {"teacher": teacher_stage_.digest, "corpus": corpus_stage_.digest}
    path, cached = build_or_reuse(cache, "oracle", key, inputs, ui, fresh, import_files if files else build)
    try:
        oracle = load_oracle(path)
    except InputError as exc:
        raise InputError(f"Oracle artifact {path} passes its checksums but cannot be used. {exc}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"Oracle artifact {path} passes its checksums but cannot be read ({exc}). Delete {path}; "
                         f"the next run recomputes it.") from exc
    rows = spec.oracle.rows
    store.check_tensor(oracle.table, "the table", (rows, spec.oracle.engram_dim), torch.float32, path / TABLE_FILE)
    store.check_tensor(oracle.sidecar, "the sidecar", (rows, corpus.vocab_size), torch.float32, path / SIDECAR_FILE)
    if oracle.shuffled_twin is not None:  # an imported twin, saved in shuffled/
        for name in ("table", "sidecar"):
            store.check_tensor(getattr(oracle.shuffled_twin, name), f"the shuffled twin's {name}",
                               tuple(getattr(oracle, name).shape), torch.float32, path / "shuffled")
    try:
        oracle.stats["tokenizers"] = check_tokenizers(corpus, teacher, spec.name)
    except InputError:  # imported files: the teacher they came from need not be on this machine
        if not files:
            raise
        oracle.stats["tokenizers"] = {"corpus": None, "teacher": None, "match": None}
    oracle.stats["teacher_health"] = check_teacher_health(spec, oracle.stats, corpus, teacher.name, path)
    return _timed("oracle", key, path, cached, t0, oracle.stats, store.content_digest(path)), oracle


def check_tokenizers(corpus: TokenCorpus, teacher, source: str) -> dict[str, Any]:
    """The corpus's tokenizer (its artifact's copy) against the teacher's: the identity record, or
    SpecError on a mismatch not allowed (ablate.oracle.tokenizer_identity.check)."""
    from ablate.oracle import tokenizer_identity

    return tokenizer_identity.check(corpus.tokenizer_path, teacher, source)


def health_reading(ce: float, log_vocab: float, unigram: float) -> str:
    """What a teacher's next-token cross-entropy (nats) on the corpus says about what it read."""
    if ce < unigram:
        return ("below the corpus's unigram entropy: the teacher predicts from context, as one reading its own "
                "tokenizer's text does")
    if ce < log_vocab:
        return ("no better than the corpus's unigram frequencies: the teacher reads no context signal (another "
                "tokenizer's ids, an untrained teacher, or a corpus without structure)")
    return ("at or above ln V, worse than uniform guessing: the teacher is reading another tokenizer's ids "
            "(or has random weights)")


def check_teacher_health(spec, stats: dict[str, Any], corpus: TokenCorpus, teacher_name: str, path: Path
                         ) -> dict[str, Any]:
    """The teacher's next-token cross-entropy in the oracle pass (stats' teacher_ce) against
    [oracle] teacher_max_ce. InputError when it does no better, unless teacher_health = "allow" or
    the teacher has random weights (the report says so already); the oracle stays cached either
    way. Returns the record kept in the oracle stats."""
    from ablate.config import expr

    ce = stats.get("teacher_ce")
    freq = corpus.frequencies.double() / corpus.frequencies.double().sum()  # [V]
    freq = freq[freq > 0]
    names = {"log_vocab": math.log(corpus.vocab_size), "vocab_size": float(corpus.vocab_size),
             "rows": float(spec.oracle.rows), "log_rows": math.log(spec.oracle.rows),
             "unigram_entropy": float(-(freq * freq.log()).sum())}
    bound = expr.evaluate(spec.oracle.teacher_max_ce, names)
    record = {"teacher_max_ce": spec.oracle.teacher_max_ce, "bound": bound, "log_vocab": names["log_vocab"],
              "unigram_entropy": names["unigram_entropy"], "passed": None if ce is None else ce < bound,
              "teacher_health": spec.oracle.teacher_health,
              "reading": None if ce is None else health_reading(ce, names["log_vocab"], names["unigram_entropy"])}
    random_weights = bool((stats.get("teacher") or {}).get("random_weights"))
    if record["passed"] is False and spec.oracle.teacher_health == "error" and not random_weights:
        raise InputError(
            f"Teacher {teacher_name!r} predicts the corpus's next tokens with a cross-entropy of {ce:.4f} nats "
            f"(top-1 accuracy {stats.get('teacher_top1', 0.0):.4f}) over the {stats.get('teacher_tokens')} tokens "
            f"of the oracle pass: no better than [oracle] teacher_max_ce = {spec.oracle.teacher_max_ce!r} = "
            f"{bound:.4f} nats (ln V = {names['log_vocab']:.4f}, unigram entropy {names['unigram_entropy']:.4f}). "
            f"That is {record['reading']}; its oracle would encode no corpus signal. Fix: tokenise the corpus with "
            f"the teacher's own tokenizer (and train the backbone on it), or train the teacher longer. The oracle "
            f"is kept in {path}, so to use it anyway (e.g. to reproduce the reference) set [oracle] teacher_health "
            f"= \"allow\" and run again.")
    return record


def json_safe(obj):
    return json.loads(json.dumps(obj, default=store._json_default))
