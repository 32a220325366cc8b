"""The shared, cached stages: corpus → backbone → teacher → oracle.

Each stage's artifact lives in `<cache>/<stage>-<key>/`, where the key hashes the stage's
resolved config, its inputs' keys and the stage's code version. A complete directory (marker
present, checksums matching) is reused; anything else is recomputed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ablate import store
from ablate.components import TeacherContext, TokenCorpus
from ablate.errors import InputError

# Bump a stage's version when its code changes what it writes.
CODE_VERSIONS = {"corpus": 1, "backbone": 1, "teacher": 1, "oracle": 1, "cell": 1, "probes": 1}


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def stage_key(stage: str, config: Any, inputs: dict[str, str]) -> str:
    return store.stable_hash({"stage": stage, "version": CODE_VERSIONS[stage], "config": config, "inputs": inputs})


def cached_dir(cache: Path, stage: str, key: str, ui) -> tuple[Path, bool]:
    """The stage directory and whether it holds a complete, uncorrupted artifact."""
    path = cache / f"{stage}-{key}"
    if not path.exists():
        return path, False
    if store.is_done(path):
        return path, True
    bad = store.corrupt_files(path)
    ui.warn(f"{stage} artifact {path.name} is incomplete or corrupt ({', '.join(bad)}); recomputing that stage")
    return path, False


def _timed(name, key, path, cached, t0, info) -> StageResult:
    return StageResult(name, key, path, cached, time.perf_counter() - t0, info)


# ------------------------------------------------------------------------------------ corpus


def corpus_key(corpus_cls, params) -> str:
    return stage_key("corpus", {"plugin": corpus_cls.name, "params": params.model_dump(mode="json")}, {})


def corpus_stage(cache: Path, corpus_cls, params, ui) -> tuple[StageResult, TokenCorpus]:
    t0 = time.perf_counter()
    key = corpus_key(corpus_cls, params)
    path, cached = cached_dir(cache, "corpus", key, ui)
    if not cached:
        with store.staging(path) as tmp:
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
            store.mark_done(tmp)
    corpus = load_corpus(path)
    info = {"vocab_size": corpus.vocab_size, "train_tokens": int(corpus.train.numel()),
            "val_tokens": int(corpus.val.numel()), **corpus.info}
    return _timed("corpus", key, path, cached, t0, info), corpus


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
    meta = store.read_json(path / "meta.json")
    train = load_file(path / "train.safetensors")
    val = load_file(path / "val.safetensors")
    corpus = TokenCorpus(train=train["tokens"], val=val["tokens"], vocab_size=meta["vocab_size"],
                         eos_id=meta["eos_id"], tokenizer_path=path / meta["tokenizer"] if meta["tokenizer"] else None,
                         info=meta["info"])
    corpus.info = {**meta["info"]}
    corpus.frequencies = train["frequencies"]  # [V] float64 counts
    return corpus


def require_tokens(corpus: TokenCorpus, seq_len: int, what: str) -> None:
    for split, stream in (("train", corpus.train), ("validation", corpus.val)):
        if stream.numel() < seq_len + 1:
            raise InputError(f"{what} seq_len {seq_len} is longer than the corpus's {split} split "
                             f"({stream.numel()} tokens). Lower {what}.seq_len or use a larger corpus.")


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


def backbone_stage(cache: Path, spec, corpus_stage_: StageResult, corpus: TokenCorpus, device, ui) -> StageResult:
    from ablate.lm_pretrain import pretrain_lm
    from ablate.model.backbone import Backbone
    from ablate.model.checkpoint import load_backbone, save_backbone

    t0 = time.perf_counter()
    config = backbone_config(spec, corpus.vocab_size)
    bb = spec.backbone
    if bb.source == "checkpoint":
        src = Path(bb.checkpoint)
        if not src.is_file():
            raise InputError(f"Backbone checkpoint {src} does not exist. Set [backbone] checkpoint to a "
                             f"safetensors file written by ablate (or any file with the backbone's tensor names), "
                             f'or use source = "pretrain" to train one on the corpus.')
        key = backbone_key(spec, corpus_stage_.key)
        load_backbone(src, expected=config)  # strict accounting and architecture check, fails early
        return _timed("backbone", key, src, True, t0, {"source": str(src)})

    key = backbone_key(spec, corpus_stage_.key)
    path, cached = cached_dir(cache, "backbone", key, ui)
    if not cached:
        require_tokens(corpus, bb.pretrain.seq_len, "backbone.pretrain")
        with store.staging(path) as tmp:
            torch.manual_seed(bb.pretrain.seed)
            model = Backbone(config).to(device)
            total = bb.pretrain.steps * bb.pretrain.batch * bb.pretrain.seq_len
            with ui.stage("backbone pretrain", total) as progress:
                stats = pretrain_lm(lambda x: model.logits(model(x)), model.parameters(), corpus.train, corpus.val,
                                    steps=bb.pretrain.steps, batch=bb.pretrain.batch, seq_len=bb.pretrain.seq_len,
                                    lr=bb.pretrain.lr, warmup=bb.pretrain.warmup, seed=bb.pretrain.seed,
                                    device=device, progress=progress)
            save_backbone(model.cpu(), tmp / "backbone.safetensors")
            store.write_json(tmp / "info.json", {**stats, "ln_vocab": math.log(corpus.vocab_size)})
            store.mark_done(tmp)
    info = store.read_json(path / "info.json")
    return _timed("backbone", key, path / "backbone.safetensors", cached, t0, info)


# ----------------------------------------------------------------------------------- teacher


def teacher_key(teacher, corpus_key_: str, seed: int) -> str:
    config = {"plugin": teacher.name, "params": teacher.params.model_dump(mode="json"), "seed": seed}
    return stage_key("teacher", config, {"corpus": corpus_key_})


def teacher_stage(cache: Path, teacher, corpus_stage_: StageResult, corpus: TokenCorpus, device, seed, ui):
    """Prepare (e.g. train and save) the teacher; returns the stage result and a context for load()."""
    t0 = time.perf_counter()
    key = teacher_key(teacher, corpus_stage_.key, seed)
    path, cached = cached_dir(cache, "teacher", key, ui)
    if not cached:
        with store.staging(path) as tmp:
            with ui.stage(f"teacher ({teacher.name})", None) as progress:
                info = teacher.prepare(TeacherContext(corpus, tmp, device, seed, progress))
            store.write_json(tmp / "info.json", info or {})
            store.mark_done(tmp)
    ctx = TeacherContext(corpus, path, device, seed)
    return _timed("teacher", key, path, cached, t0, store.read_json(path / "info.json")), ctx


# ------------------------------------------------------------------------------------ oracle


def oracle_config(spec):
    from ablate.oracle import OracleConfig

    o = spec.oracle
    return OracleConfig(rows=o.rows, engram_dim=o.engram_dim, seeds=tuple(o.seeds), orders=tuple(o.orders),
                        batch=o.batch, seq_len=o.seq_len, pca_sample_min=o.pca_sample_min,
                        pca_sample_frac=o.pca_sample_frac, pca_seed=o.pca_seed, shuffle_seed=o.shuffle_seed,
                        cos_sample=o.cos_sample, max_tokens=o.max_tokens)


def oracle_key(spec, teacher_key_: str, corpus_key_: str) -> str:
    return stage_key("oracle", spec.oracle.model_dump(), {"teacher": teacher_key_, "corpus": corpus_key_})


def oracle_stage(cache: Path, spec, teacher, teacher_stage_: StageResult, teacher_ctx, corpus_stage_: StageResult,
                 corpus: TokenCorpus, device, ui):
    from ablate.oracle import build_oracle, load_oracle, save_oracle

    t0 = time.perf_counter()
    cfg = oracle_config(spec)
    key = oracle_key(spec, teacher_stage_.key, corpus_stage_.key)
    path, cached = cached_dir(cache, "oracle", key, ui)
    if not cached:
        require_tokens(corpus, cfg.seq_len, "oracle")
        loaded = teacher.load(teacher_ctx)
        if loaded.vocab_size != corpus.vocab_size:
            raise InputError(f"Teacher {teacher.name!r} has a vocabulary of {loaded.vocab_size} tokens but the corpus and "
                             f"backbone use {corpus.vocab_size}. Use a teacher trained with the corpus's tokenizer.")
        n_tokens = (corpus.train.numel() // cfg.seq_len) * cfg.seq_len
        if cfg.max_tokens:
            n_tokens = min(n_tokens, cfg.max_tokens)
        with store.staging(path) as tmp:
            with ui.stage("oracle pass", n_tokens) as progress:
                oracle = build_oracle(loaded, corpus.train, cfg, device, progress)
            save_oracle(oracle, tmp)
            store.mark_done(tmp)
        del loaded
    try:
        oracle = load_oracle(path)
    except (InputError, SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"Oracle artifact {path} could not be read ({exc}). Delete that directory; "
                         f"the next run recomputes it.") from exc
    return _timed("oracle", key, path, cached, t0, oracle.stats), oracle


def json_safe(obj):
    return json.loads(json.dumps(obj, default=store._json_default))
