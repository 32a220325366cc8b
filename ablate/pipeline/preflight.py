"""Checks before any work: everything that needs the plugins but no heavy computation. `ctx` is
the run's Experiment (it receives `corpus_params` and `teacher`)."""

from __future__ import annotations

from pathlib import Path

from ablate.pipeline import stages
from ablate.errors import InputError
from ablate.config.spec import Spec


def preflight(ctx):
    """Checks that need plugins but no heavy work: input files exist, the backbone checkpoint
    is readable, every probe name is unambiguous, the teacher is reachable (or the oracle
    files are well-formed), vocabularies and tokenizers match (each when known before loading)."""
    corpus_cls = ctx.registry.get("corpus", ctx.spec.corpus.plugin)
    teacher_cls = ctx.registry.get("teacher", ctx.spec.teacher.plugin)
    ctx.corpus_params = corpus_cls.Params.model_validate(corpus_params(ctx.spec, corpus_cls))
    ctx.teacher = teacher_cls(teacher_cls.Params.model_validate(ctx.spec.teacher.params()))
    _check_paths(ctx.corpus_params, "corpus")
    _check_paths(ctx.teacher.params, "teacher")
    stages.check_backbone_checkpoint(ctx.spec)
    from ablate.pipeline.probe_selection import selected_probes

    selected_probes(ctx.spec, ctx.registry)  # a selected name two plugins claim fails now, not after training
    corpus = corpus_cls(ctx.corpus_params)
    vocab = corpus.known_vocab_size()
    if ctx.spec.oracle.source == "files":  # no teacher pass: the files are checked instead of the teacher
        from ablate.oracle import files as oracle_files

        oracle_files.check_headers(ctx.spec.oracle, vocab)
    elif vocab is not None:
        ctx.teacher.check(vocab)  # else the vocabulary is known only after tokenising: checked then
    check_tokenizers(ctx, corpus.tokenizer_file())  # again after tokenising
    from ablate.pipeline import memory

    memory.check_run(ctx)  # every stage's estimated peak fits the device (or --memory-budget)
    return corpus_cls

def check_tokenizers(ctx, corpus_tokenizer) -> dict:
    """Corpus vs teacher tokenizer; with an oracle from files the teacher only names the model the
    files came from, so a teacher that cannot be located here is no error."""
    from ablate.oracle import tokenizer_identity

    try:
        return tokenizer_identity.check(corpus_tokenizer, ctx.teacher, ctx.spec.name)
    except InputError:
        if ctx.spec.oracle.source != "files":
            raise
        return {"corpus": None, "teacher": None, "match": None}


def corpus_params(spec: Spec, corpus_cls) -> dict:
    """The corpus plugin's parameters from the spec; under numerics = "upstream" a corpus that
    splits one stream defaults to the reference's chunk-aligned validation split."""
    params = spec.corpus.params()
    if spec.numerics == "upstream" and "val_split" in corpus_cls.Params.model_fields:
        params.setdefault("val_split", "chunks")
    return params


def _check_paths(params, where: str) -> None:
    """InputError for any file or folder a plugin's parameters name that does not exist."""
    install = getattr(params, "install", None)  # e.g. text-files' command that creates its files
    for name, value in params:
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(p, Path) and not p.exists():
                raise InputError(f"[{where}] {name} = {str(p)!r} does not exist. Fix the path in the spec "
                                 f"(relative paths are read from the directory you run ablate in)"
                                 + (f", or create the files with: {install}" if install else "") + ".")
