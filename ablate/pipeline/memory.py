"""Peak host and GPU memory of every stage, estimated from the spec before anything runs.

`estimate(spec, device_type)` → one `StageMemory` per stage (corpus, backbone, teacher, oracle, the
largest cell, probes), each a list of terms (what, bytes, the spec key that scales it). `ablate plan`
prints them; `ablate validate` and `ablate run` refuse a spec whose peak does not fit the device or
`--memory-budget` (`check`), naming the stage and the knob to turn.

The formulas count the tensors the code holds at each stage's peak (docs/performance.md, "Knowing
before running whether it fits"). Where the code's transient buffers are not worth modelling one
by one, a count of [positions, V]-sized tensors stands for them; those counts and the allocator's
overhead were calibrated against the peaks measured at reference dimensions (ZEB-139 on an
H100/H200, docs/performance.md "A measured full-scale run"): every stage's estimate lies within
±20 % of the measured peak allocated and reserved memory (tests/pipeline/test_memory.py). Host
figures are not calibrated (no host peaks were measured): they add up the host copies the code makes.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.errors import SpecError

GIB = 2**30

# Calibration (reference dimensions, docs/performance.md). Peak reserved / peak allocated measured
# 1.05–1.33 over the stages (oracle 14.40/12.41, compiled cells 6.42–6.64/5.73, eager cells
# 8.08/7.72, probes 12.38–15.54/11.7): the caching allocator's blocks and the CUDA-graph pool.
RESERVED_FACTOR = 1.15
CUDA_CONTEXT_BYTES = 0.5 * GIB  # the CUDA context and kernels: on the card, outside the allocator
HOST_BASELINE_BYTES = 1.0 * GIB  # Python, torch and its libraries (not calibrated)
# [B·T, V] logit-sized tensors a training step holds at its peak, in the autocast dtype: the logits,
# the loss gradient written in the forward pass, the loss chunks (router off, compiled); the router
# adds its logits, the merged-logit snapshot, its gradient and the KL chunks; eager execution keeps
# about four more (measured: +2.0 GiB both with the router on and off).
CELL_LOGITS = 3
CELL_ROUTER_LOGITS = 4
CELL_EAGER_LOGITS = 4
# With the fused loss head (CUDA, numerics "ablate": Student.uses_fused_head) no [B·T, V] tensor
# exists; the loss works on chunks of LOSS_CHUNK positions. Float32 [LOSS_CHUNK, V]-sized tensors a
# step holds at its peak (the chunk's logits, its gradient, the loss pass's temporaries; the router
# adds its own chunk and the sidecar rows'), calibrated on an H200 (2026-11-29, reference
# dimensions; docs/performance.md). Eager execution keeps the CELL_EAGER_LOGITS extra as before.
LOSS_CHUNK = 2048
HEAD_CHUNKS = 3.4
HEAD_ROUTER_CHUNKS = 2.4
# activations saved per position per backbone layer behind the first injection, in units of
# (hidden_dim + ffn_dim) values of the autocast dtype (router-off compiled cell: 2.67 GiB)
CELL_ACTIVATION_WIDTHS = 7
# probes: float32 [B·T, V] tensors alive at once. The probes' own arithmetic runs 1,024 positions at
# a time. With the fused loss head a trace forms only the logits a probe reads (the router's): a pair
# probe's two traces hold one each, plus one being formed; measured on an H200 (2026-11-29, reference
# dimensions: 6.34 GiB allocated, 6.59 reserved). With whole logits each trace holds two, plus the
# forward's two being summed: a count, not calibrated.
PROBE_LOGITS_FUSED_HEAD = 3
PROBE_LOGITS = 6
PRETRAIN_LOGITS = 3  # backbone / teacher pretraining: logits, log-softmax, gradient (float32)

# TinyLlama/TinyLlama_v1.1 config.json, used when the tinyllama teacher's config is not on this
# machine (the reference's teacher; 1,100,048,384 parameters)
TINYLLAMA = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}
DEFAULT_VOCAB = 32000


@dataclass
class Term:
    what: str
    bytes: float
    knob: str = ""  # the spec key that scales it ("" when none does)
    short: str = ""  # a few words for `ablate plan`'s table (default: what)


@dataclass
class StageMemory:
    """One stage's peak: `host` terms live in host memory, `device` terms on the compute device
    (host memory too when that is the CPU)."""

    stage: str
    device_type: str
    host: list[Term] = field(default_factory=list)
    device: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def host_bytes(self) -> float:
        """Peak host memory (on the CPU the device terms too), baseline included."""
        on_host = self.host + (self.device if self.device_type == "cpu" else [])
        return HOST_BASELINE_BYTES + sum(t.bytes for t in on_host)

    @property
    def allocated_bytes(self) -> float:
        """Peak allocated device memory (the allocator's max_memory_allocated)."""
        return sum(t.bytes for t in self.device)

    @property
    def reserved_bytes(self) -> float:
        """Peak reserved device memory (max_memory_reserved): what the card must hold, context aside."""
        return self.allocated_bytes * (RESERVED_FACTOR if self.device_type == "cuda" else 1.0)

    def largest(self, on: str, n: int = 2) -> list[Term]:
        terms = self.device if on == "device" else self.host + (self.device if self.device_type == "cpu" else [])
        return sorted((t for t in terms if t.bytes > 0), key=lambda t: -t.bytes)[:n]


# ------------------------------------------------------------------------------- dimensions


def _llama_params(c: dict) -> int:
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    head = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head
    q = c["num_attention_heads"] * head
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    embed = c["vocab_size"] * h
    return layers * per_layer + h + embed * (1 if c.get("tie_word_embeddings") else 2)


@dataclass
class TeacherShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    states: int  # hidden states its forward holds at once (an HF model: 1, taken by a hook; same-arch: 2)
    dtype_bytes: int
    trains: bool  # trained in the teacher stage (llama-local, same-arch without checkpoint)
    batch: int = 0
    seq_len: int = 0
    ffn: int = 0
    source: str = ""


def _hf_config(model: str | None, revision: str) -> dict | None:
    """config.json of a local directory or a hub id in the local HF cache, else None (nothing is
    downloaded)."""
    if not model:
        return None
    local = Path(model).expanduser()
    path = local / "config.json" if local.is_dir() else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, "config.json", revision=revision)
            path = Path(found) if isinstance(found, str) else None
        except Exception:
            path = None
    try:
        config = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return {**config.get("text_config", {}), **{k: v for k, v in config.items() if k != "text_config"}}


def _dtype_bytes(name: str | None, device_type: str) -> int:
    if name in ("bfloat16", "float16"):
        return 2
    if name in (None, "auto"):
        return 2 if device_type == "cuda" else 4
    return 4


def teacher_shape(spec, device_type: str, vocab: int | None) -> TeacherShape | None:
    """The teacher's size from its parameters (llama-local, same-arch), its config.json (a Hugging
    Face model found locally) or, for tinyllama, TinyLlama v1.1's published config; None when unknown."""
    plugin, p = spec.teacher.plugin, spec.teacher.params()
    if plugin == "llama-local" or {"hidden_size", "num_layers", "intermediate_size"} <= set(p):
        c = {"hidden_size": p.get("hidden_size", 128), "num_hidden_layers": p.get("num_layers", 4),
             "intermediate_size": p.get("intermediate_size", 344), "num_attention_heads": p.get("num_heads", 4),
             "num_key_value_heads": p.get("num_kv_heads", 2), "vocab_size": vocab or DEFAULT_VOCAB}
        return TeacherShape(_llama_params(c), c["hidden_size"], c["num_hidden_layers"], c["vocab_size"],
                            1, _dtype_bytes(p.get("dtype", "float32"), device_type), True,
                            p.get("batch", 16), p.get("seq_len", 128), c["intermediate_size"], "its parameters")
    if plugin == "same-arch":
        from ablate.model.backbone import BackboneConfig

        names = ("hidden_dim", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "ffn_dim",
                 "layers_per_block", "max_seq_len", "rope_theta")
        config = BackboneConfig(vocab_size=vocab or DEFAULT_VOCAB, **{n: p[n] for n in names if p.get(n) is not None})
        return TeacherShape(config.num_parameters(), config.hidden_dim, config.num_layers, config.vocab_size, 2,
                            _dtype_bytes(p.get("dtype", "auto"), device_type), p.get("checkpoint") is None,
                            p.get("batch", 16), p.get("seq_len", 128), config.ffn_dim, "its parameters")
    if p.get("gguf_file"):
        config, source = _gguf_config(p["gguf_file"]), "the GGUF file's header"
    else:
        config = _hf_config(p.get("model", "TinyLlama/TinyLlama_v1.1" if plugin == "tinyllama" else None),
                            p.get("revision", "main"))
        source = "config.json"
    if config is None and plugin == "tinyllama":
        config, source = dict(TINYLLAMA), "TinyLlama v1.1's config (not found on this machine)"
    try:
        shape = TeacherShape(_llama_params(config), config["hidden_size"], config["num_hidden_layers"],
                             config["vocab_size"], 1,
                             _dtype_bytes(p.get("dtype", "auto"), device_type), False, source=source)
    except (TypeError, KeyError, ZeroDivisionError):
        return None
    return shape


def _gguf_config(value: str) -> dict | None:
    """The Llama config fields of a GGUF teacher, read from the file's header (no tensor data);
    None when the file or the `gguf` package is missing (preflight names those)."""
    try:
        from ablate_builtins import gguf

        return gguf.read_meta(gguf.find_gguf(value))
    except Exception:
        return None


@dataclass
class StudentShape:
    backbone_params: int
    buffers: int  # table and RoPE caches (float32 values)
    adapters: dict[bool, int]  # router → trainable parameters


def student_shape(spec, vocab: int) -> StudentShape:
    """Exact parameter counts of the student, from the shapes (BackboneConfig.num_parameters,
    EngramConfig.trainable_parameters): nothing is built."""
    from dataclasses import replace

    from ablate.pipeline.stages import backbone_config
    from ablate.training.cells import engram_config

    config = backbone_config(spec, vocab)
    engram = engram_config(spec, spec.cells[0])
    adapters = {router: replace(engram, router=router).trainable_parameters(config.hidden_dim)
                for router in (False, True)}
    buffers = config.rope_elements() + spec.oracle.rows * spec.oracle.engram_dim
    return StudentShape(config.num_parameters(), buffers, adapters)


def corpus_tokens(spec) -> int | None:
    """Tokens of the corpus when the spec says or its shard headers do (nothing is read in full)."""
    p = spec.corpus.params()
    if isinstance(p.get("n_tokens"), int):
        return p["n_tokens"]
    if isinstance(p.get("max_tokens"), int):
        return p["max_tokens"]
    paths = p.get("paths")
    if paths is None:
        return None
    total = 0
    for pattern in [paths] if isinstance(paths, str) else paths:
        expanded = os.path.expanduser(str(pattern))
        files = sorted(globlib.glob(expanded, recursive=True)) if globlib.has_magic(expanded) else [expanded]
        if not files:
            return None
        for f in files:
            n = _shard_tokens(Path(f), p.get("tensor", "tokens"))
            if n is None:
                return None
            total += n
    return total


def _shard_tokens(path: Path, tensor: str) -> int | None:
    try:
        if path.suffix == ".npy":
            import numpy as np

            return int(np.load(path, mmap_mode="r", allow_pickle=False).size)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                return int(math.prod(f.get_slice(tensor).get_shape()))
    except Exception:
        return None
    return None


def vocab_size(spec, teacher: TeacherShape | None, registry=None) -> tuple[int, str | None]:
    """The student's vocabulary: the spec's, else the corpus plugin's known size (its tokenizer
    file, read without tokenising), else the teacher's, else DEFAULT_VOCAB with a note."""
    v = spec.corpus.params().get("vocab_size")
    if isinstance(v, int) and v > 0:
        return v, None
    known = _corpus_vocab(spec, registry)
    if known:
        return known, None
    if teacher is not None:
        return teacher.vocab, None
    return DEFAULT_VOCAB, f"the vocabulary size is not in the spec: {DEFAULT_VOCAB:,} assumed"


def _corpus_vocab(spec, registry) -> int | None:
    if registry is None:
        return None
    from ablate.pipeline.preflight import corpus_params

    try:
        corpus_cls = registry.get("corpus", spec.corpus.plugin)
        return corpus_cls(corpus_cls.Params.model_validate(corpus_params(spec, corpus_cls))).known_vocab_size()
    except Exception:  # an unreadable tokenizer or bad parameters: preflight reports those
        return None


# -------------------------------------------------------------------------------- estimate


def estimate(spec, device_type: str = "cuda", registry=None) -> list[StageMemory]:
    """Every stage's peak memory for a run of `spec` on a device of `device_type` ("cuda" or "cpu"):
    bf16 where the run uses it on CUDA (autocast, "auto" teacher dtypes), float32 on the CPU."""
    notes: list[str] = []
    shape = teacher_shape(spec, device_type, spec.corpus.params().get("vocab_size"))
    V, why = vocab_size(spec, shape, registry)
    notes += [why] if why else []
    if shape is None and spec.oracle.source != "files":
        notes.append(f"the size of teacher {spec.teacher.plugin!r} is unknown here: its weights and activations "
                     "are not counted")
    tokens = corpus_tokens(spec)
    corpus_bytes = 8 * (tokens or 0)  # the int64 stream (train + validation)
    corpus = [Term("corpus tokens (int64)", corpus_bytes, "corpus", "corpus")] if tokens else []
    if tokens is None:
        notes.append("the corpus size is unknown before tokenising: the corpus is not counted")
    student = student_shape(spec, V)
    bf16 = device_type == "cuda"

    stages = [StageMemory("corpus", device_type, host=[Term("corpus tokens while tokenising (int64, 2 copies)",
                                                            2 * corpus_bytes, "corpus", "corpus")] if tokens else [])]
    stages.append(_backbone_stage(spec, device_type, corpus, student, V))
    stages.append(_teacher_stage(spec, device_type, corpus, shape, V))
    stages.append(_oracle_stage(spec, device_type, corpus, shape, V, tokens))
    stages.append(_cells_stage(spec, device_type, corpus, student, V, registry, bf16))
    stages.append(_probes_stage(spec, device_type, corpus, student, V))
    for s in stages:
        s.notes = notes
    return stages


def _sidecar_bytes(spec) -> int:
    return 2 if spec.numerics == "upstream" else 4  # upstream trains against the bf16 sidecar


def _backbone_stage(spec, device_type, corpus, student: StudentShape, V: int) -> StageMemory:
    bb = spec.backbone
    s = StageMemory("backbone", device_type, host=list(corpus))
    weights = 4 * student.backbone_params
    if bb.source == "checkpoint":
        s.host.append(Term("backbone checkpoint (float32)", weights, "", "backbone weights"))
        return s
    pre = bb.pretrain
    P = pre.batch * pre.seq_len
    s.device += [Term("backbone weights, gradients, Adam state (float32)", 4 * weights, "backbone.hidden_dim", "backbone + Adam"),
                 Term(f"pretraining logits [{pre.batch}·{pre.seq_len}, {V:,}] float32 ×{PRETRAIN_LOGITS}",
                      PRETRAIN_LOGITS * P * V * 4, "backbone.pretrain.batch", "pretraining logits"),
                 Term("pretraining activations", P * bb.num_layers * CELL_ACTIVATION_WIDTHS
                      * (bb.hidden_dim + bb.ffn_dim) * 4, "backbone.pretrain.batch", "activations")]
    return s


def _teacher_stage(spec, device_type, corpus, shape: TeacherShape | None, V: int) -> StageMemory:
    s = StageMemory("teacher", device_type, host=list(corpus))
    if spec.oracle.source == "files" or shape is None or not shape.trains:
        return s
    P = shape.batch * shape.seq_len
    s.device += [Term("teacher weights, gradients, Adam state (float32)", 16 * shape.params, "teacher.hidden_size", "teacher + Adam"),
                 Term(f"teacher pretraining logits [{shape.batch}·{shape.seq_len}, {V:,}] float32 ×{PRETRAIN_LOGITS}",
                      PRETRAIN_LOGITS * P * V * 4, "teacher.batch", "pretraining logits"),
                 Term("teacher pretraining activations", P * shape.layers * CELL_ACTIVATION_WIDTHS
                      * (shape.hidden + shape.ffn) * 4, "teacher.batch", "activations")]
    return s


def _oracle_stage(spec, device_type, corpus, shape: TeacherShape | None, V: int, tokens: int | None) -> StageMemory:
    o = spec.oracle
    s = StageMemory("oracle", device_type, host=list(corpus))
    table = o.rows * o.engram_dim * 4
    if o.source == "files":  # imported: the files are read and checked on the host
        twin = 2 if o.shuffled_table else 1
        s.host += [Term(f"imported sidecar [{o.rows:,} × {V:,}] float32" + (" and its shuffled twin" if twin > 1 else ""),
                        twin * o.rows * V * 4, "oracle.rows", "imported sidecar"),
                   Term("imported table", twin * table, "oracle.rows", "imported table")]
        return s
    H = shape.hidden if shape else 0
    s.device.append(Term(f"sidecar sums [{o.rows + 1:,} × {V:,}] float32", (o.rows + 1) * V * 4, "oracle.rows", "sidecar sums"))
    if shape is not None:
        tb = shape.dtype_bytes
        positions = o.batch * o.seq_len
        for cap in (o.max_tokens, tokens):
            positions = min(positions, cap) if cap else positions
        per_position = shape.states * H * tb + V * tb + (V * 4 + H * 4 if tb != 4 else 0)
        s.device += [Term(f"hidden-state sums [{o.rows + 1:,} × {H:,}] float64", (o.rows + 1) * H * 8, "oracle.rows", "hidden sums"),
                     Term(f"teacher weights ({shape.params / 1e9:.2f}B parameters, {8 * tb}-bit)",
                          shape.params * tb, "teacher", "teacher weights"),
                     Term(f"teacher outputs for one batch [{o.batch}·{o.seq_len}]: {shape.states} hidden "
                          f"state{'s' if shape.states > 1 else ''}, logits [·, {V:,}] and their float32 copies",
                          positions * per_position,
                          "oracle.batch", "teacher outputs, one batch")]
        if not shape.trains and device_type == "cuda":  # from_pretrained reads the weights on the host first
            s.host.append(Term("teacher weights while loading", shape.params * tb, "teacher", "teacher weights"))
    s.host += [Term(f"oracle on the host: sidecar means [{o.rows:,} × {V:,}] float32", o.rows * V * 4, "oracle.rows", "sidecar"),
               Term("oracle on the host: hidden means and table", o.rows * (H * 4 + o.engram_dim * 4), "oracle.rows", "hidden means, table")]
    return s


def _needs_sidecar(cell, registry) -> bool:
    if registry is not None:
        try:
            return bool(registry.get("objective", cell.objective.name).needs_sidecar)
        except Exception:
            pass
    return bool(cell.router)  # without the plugins: the router-on cells of the built-in specs train on it


def cell_memory(spec, device_type: str = "cuda", registry=None) -> dict[str, StageMemory]:
    """Every cell's own peak (device terms only), by cell name."""
    shape = teacher_shape(spec, device_type, spec.corpus.params().get("vocab_size"))
    V, _ = vocab_size(spec, shape, registry)
    return _cells(spec, device_type, student_shape(spec, V), V, registry, device_type == "cuda")


def _cells(spec, device_type, student: StudentShape, V: int, registry, bf16: bool) -> dict[str, StageMemory]:
    from ablate.training.cells import compile_cells

    t, o = spec.train, spec.oracle
    P = t.batch * t.seq_len
    ab = 2 if bf16 and t.precision == "bf16" else 4
    eager = not (device_type == "cuda" and compile_cells(spec))
    first = min(spec.model.inject_layers) if spec.model.inject_layers else 0
    grad_layers = max(spec.backbone.num_layers - 1 - first, 0)
    sidecar = o.rows * V * _sidecar_bytes(spec)
    out = {}
    for cell in spec.cells:
        s = StageMemory(f"cells ({cell.name})" if len(spec.cells) > 1 else "cells", device_type)
        s.device += [Term("frozen backbone (float32) and oracle table", 4 * (student.backbone_params + student.buffers),
                          "oracle.rows", "backbone, table"),
                     Term("adapters, gradients, optimiser state", 16 * student.adapters[cell.router], "", "adapters + optimiser"),
                     *_logit_terms(spec, device_type, cell.router, eager, P, V, ab),
                     Term("backbone activations behind the first injection", P * grad_layers * CELL_ACTIVATION_WIDTHS
                          * (spec.backbone.hidden_dim + spec.backbone.ffn_dim) * ab, "train.seq_len",
                          "activations")]
        if _needs_sidecar(cell, registry):
            s.device.append(Term(f"sidecar on the device [{o.rows:,} × {V:,}]", sidecar, "oracle.rows", "sidecar"))
        out[cell.name] = s
    return out


def _logit_terms(spec, device_type: str, router: bool, eager: bool, P: int, V: int, ab: int) -> list[Term]:
    """A training step's logit-sized working memory: whole [B·T, V] logits, or with the fused loss head
    (CUDA under numerics "ablate") float32 chunks of LOSS_CHUNK positions; eager execution's extra."""
    terms = []
    if device_type == "cuda" and spec.numerics == "ablate":
        n = HEAD_CHUNKS + (HEAD_ROUTER_CHUNKS if router else 0)
        c = min(LOSS_CHUNK, P)
        terms.append(Term(f"fused loss head: [{c:,}, {V:,}] float32 chunks ×{n:g}", n * c * V * 4, "",
                          f"loss chunks ×{n:g}"))
    else:
        n = CELL_LOGITS + (CELL_ROUTER_LOGITS if router else 0)
        terms.append(Term(f"logits [{P:,}, {V:,}] ×{n} ({8 * ab}-bit)", n * P * V * ab, "train.batch", f"logits ×{n}"))
    if eager:
        terms.append(Term(f"eager execution's intermediates ([{P:,}, {V:,}] {8 * ab}-bit ×{CELL_EAGER_LOGITS})",
                          CELL_EAGER_LOGITS * P * V * ab, "train.compile", "eager extra"))
    return terms


def fused_groups(spec, device_type: str) -> list[list]:
    """The cells `train.fuse` trains as groups on `device_type` in the local executor (two or more
    cells with the same data seed; ablate.pipeline.fused_job.fuse_key within one spec)."""
    from ablate.training.cells import fuses, training_seeds

    if not fuses(spec, device_type) or spec.executor.plugin != "local":
        return []
    groups: dict[int, list] = {}
    for cell in spec.cells:
        groups.setdefault(training_seeds(spec, cell)[1], []).append(cell)
    return [g for g in groups.values() if len(g) > 1]


def _group(spec, cells: list, per_cell: dict[str, StageMemory], V: int, registry, device_type: str) -> StageMemory:
    """A fused group's peak, counted as its members' own peaks at once (every member's logits,
    activations, adapters and optimiser state live through the group's step), with the frozen
    backbone once and each distinct sidecar once (shuffled and gaussian share one)."""
    o = spec.oracle
    s = StageMemory(f"cells (fused group: {', '.join(c.name for c in cells)})", device_type)
    frozen, *_ = per_cell[cells[0].name].device
    s.device.append(Term(frozen.what + f", {len(cells)} tables", frozen.bytes + (len(cells) - 1) * 4 * o.rows
                         * o.engram_dim, frozen.knob, frozen.short))
    for short, knob in (("adapters + optimiser", ""), ("activations", "train.seq_len")):
        s.device.append(Term(f"{short}, {len(cells)} cells", sum(t.bytes for c in cells for t in per_cell[c.name].device
                                                                    if t.short == short), knob, short))
    logits = sum(t.bytes for c in cells for t in per_cell[c.name].device if t.short.startswith("logits"))
    if logits:  # whole [B·T, V] logits (not with the fused loss head)
        s.device.append(Term(f"logits, {len(cells)} cells", logits, "train.batch", "logits"))
    # the fused loss head's chunks exist during one member's loss at a time; eager intermediates of
    # every member live until the group's backward
    chunks = [t for c in cells for t in per_cell[c.name].device if t.short.startswith("loss chunks")]
    if chunks:
        s.device.append(max(chunks, key=lambda t: t.bytes))
    eager = sum(t.bytes for c in cells for t in per_cell[c.name].device if t.short == "eager extra")
    if eager:
        s.device.append(Term(f"eager execution's intermediates, {len(cells)} cells", eager, "train.compile",
                             "eager extra"))
    sidecars = {c.oracle == "real" for c in cells if _needs_sidecar(c, registry)}
    if sidecars:
        s.device.append(Term(f"{len(sidecars)} sidecar(s) on the device [{o.rows:,} × {V:,}]",
                             len(sidecars) * o.rows * V * _sidecar_bytes(spec), "oracle.rows", "sidecars"))
    s.notes.append('a fused group (train.fuse = "auto"); "off" trains its cells one after another')
    return s


def _cells_stage(spec, device_type, corpus, student: StudentShape, V: int, registry, bf16: bool) -> StageMemory:
    """The largest cell or fused group (they run one after another), with the stage's host copies."""
    o = spec.oracle
    per_cell = _cells(spec, device_type, student, V, registry, bf16)
    groups = fused_groups(spec, device_type)
    fused = [_group(spec, g, per_cell, V, registry, device_type) for g in groups]
    grouped = {c.name for g in groups for c in g}
    candidates = fused + [m for name, m in per_cell.items() if name not in grouped]
    best = max(candidates, key=lambda s: s.allocated_bytes)
    # host: the engine's oracle variants and the cell job's own (real and shuffled sidecars, 3 tables),
    # plus bf16 copies under upstream numerics; the corpus twice (engine and job)
    copies = 2 * (2 * o.rows * V * (4 + (2 if spec.numerics == "upstream" else 0)) + 3 * o.rows * o.engram_dim * 4)
    best.host += [*(Term(c.what + " (engine and cell job)", 2 * c.bytes, c.knob, c.short) for c in corpus),
                  Term("oracle variants on the host (engine and cell job)", copies, "oracle.rows", "oracle variants")]
    return best


def _probes_stage(spec, device_type, corpus, student: StudentShape, V: int) -> StageMemory:
    p, o = spec.probes, spec.oracle
    P = p.batch * (p.seq_len or spec.train.seq_len)
    variants = len({c.oracle for c in spec.cells})
    n = len(spec.cells)
    s = StageMemory("probes", device_type, host=list(corpus))
    n_logits = PROBE_LOGITS_FUSED_HEAD if device_type == "cuda" and spec.numerics == "ablate" else PROBE_LOGITS
    s.device += [Term(f"sidecars on the device ({variants} oracle variant{'s' if variants > 1 else ''})",
                      variants * o.rows * V * _sidecar_bytes(spec), "oracle.rows", "sidecars"),
                 Term(f"{n} trained students (float32)", n * 4 * (student.backbone_params + student.buffers
                                                                  + student.adapters[True]), "", "students"),
                 Term(f"traced logits [{p.batch}·{p.seq_len or spec.train.seq_len}, {V:,}] float32 ×{n_logits}",
                      n_logits * P * V * 4, "probes.batch", f"logits ×{n_logits}")]
    s.host.append(Term("oracle variants on the host", 2 * o.rows * V * 4, "oracle.rows", "oracle variants"))
    return s


# ----------------------------------------------------------------------------------- check


def parse_size(text: str) -> int:
    """"16GiB", "16 GB", "512MiB", "16G" (binary), "16" (GiB) → bytes. ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", text, flags=re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"{text!r} is not a memory size; write e.g. 16GiB, 80GB or 512MiB")
    number, prefix, binary, unit = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    if not prefix:
        return int(number * (GIB if not unit else 1))
    power = "KMGT".index(prefix) + 1
    decimal = unit and not binary  # "GB": 10⁹; "GiB" and a bare "G": 2³⁰
    value = number * ((1000 if decimal else 1024) ** power)
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return int(value)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (os.sysconf), or the cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def cuda_memory(device) -> tuple[int, str]:
    import torch

    props = torch.cuda.get_device_properties(device)
    return int(props.total_memory), props.name


@dataclass
class Limit:
    device_type: str  # what the estimate is for: "cuda" or "cpu"
    device_bytes: int | None  # the GPU's memory (or the budget); on the CPU the host's (or the budget)
    device_label: str
    host_bytes: int | None = None  # host RAM, checked on CUDA; None: not checked
    budget: bool = False


def limit_for(device=None, budget: int | None = None) -> Limit:
    """What a run may use: `device` (a torch.device or name; None: where `ablate run` would run
    by default), with `budget` (bytes) in place of its memory. A budget without a device stands for
    the GPU a user plans to use: the CUDA estimate is checked against it, and this machine's RAM is not."""
    import torch

    if device is None and budget is not None:
        return Limit("cuda", budget, f"--memory-budget {fmt_gib(budget)} GiB", budget=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    host = host_memory_bytes()
    if device.type == "cuda":
        if budget is not None:
            return Limit("cuda", budget, f"--memory-budget {fmt_gib(budget)} GiB", host, True)
        total, name = cuda_memory(device)
        return Limit("cuda", total, f"{fmt_gib(total)} GiB of this GPU ({name})", host)
    if budget is not None:
        return Limit("cpu", budget, f"--memory-budget {fmt_gib(budget)} GiB", budget=True)
    return Limit("cpu", host, f"{fmt_gib(host)} GiB of host memory (no GPU here: the run would be on the CPU, "
                              "in float32)" if host else "")


def cap_cuda(device, budget: int) -> float:
    """Hold this process's CUDA caching allocator to `budget` bytes (torch.cuda.set_per_process_memory_fraction),
    so that a run checked against --memory-budget 16GiB on a larger card fails with out-of-memory
    where the 16 GiB card would, instead of quietly using more. Returns the fraction of the card."""
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no index
    total, _ = cuda_memory(index)
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def fmt_gib(n: float | None) -> str:
    if n is None:
        return "—"
    g = n / GIB
    return f"{g:,.2f}" if g < 10 else f"{g:,.1f}"


_KNOB_HINTS = {
    "oracle.rows": "oracle.rows (the sidecar grows as rows × vocabulary)",
    "oracle.batch": "oracle.batch or oracle.seq_len (the teacher's outputs for one batch)",
    "train.batch": "train.batch or train.seq_len (the [batch·seq_len, vocabulary] logits of a step)",
    "train.seq_len": "train.seq_len or train.batch (the activations of a step)",
    "probes.batch": "probes.batch or probes.seq_len (the probes' [batch·seq_len, vocabulary] logits)",
    "backbone.pretrain.batch": "backbone.pretrain.batch or backbone.pretrain.seq_len",
    "backbone.hidden_dim": "the backbone's size",
    "teacher.batch": "the teacher's batch or seq_len",
    "teacher.hidden_size": "the teacher's size",
    "teacher": "the teacher's size (a smaller model, or [teacher] dtype = \"bfloat16\")",
    "corpus": "the corpus size (fewer shards, or [corpus] max_tokens)",
}


def problems(stages: list[StageMemory], limit: Limit) -> list[tuple[str, str]]:
    """(knob, paragraph) for every stage whose estimated peak exceeds the limit: the memory it
    would need against what there is, its largest parts and the spec keys to lower."""
    out = []
    for s in stages:
        over = []  # (kind, need, have, label, which terms)
        if limit.device_type == "cuda":
            if limit.device_bytes is not None and s.device:
                over.append(("GPU", s.reserved_bytes + CUDA_CONTEXT_BYTES, limit.device_bytes, limit.device_label,
                             "device"))
            if limit.host_bytes is not None:
                over.append(("host", s.host_bytes, limit.host_bytes, f"{fmt_gib(limit.host_bytes)} GiB of host memory",
                             "host"))
        elif limit.device_bytes is not None:
            over.append(("host", s.host_bytes, limit.device_bytes, limit.device_label, "host"))
        over = [o for o in over if o[1] > o[2]]
        if not over:
            continue
        big = s.largest(over[0][4])
        knobs = list(dict.fromkeys(t.knob for t in big if t.knob))
        needs = " and ".join(
            f"about {fmt_gib(need)} GiB of {kind} memory"
            + (" (peak reserved: the allocator's overhead and the CUDA context included)" if kind == "GPU" else "")
            + f", more than the {label}" for kind, need, have, label, _ in over)
        terms = "; ".join(f"{t.what}: {fmt_gib(t.bytes)} GiB" for t in big)
        turn = ", or ".join(_KNOB_HINTS.get(k, k) for k in knobs) or "the sizes in the spec"
        if s.stage.startswith("cells (fused group"):
            knobs.insert(0, "train.fuse")
            turn = 'set train.fuse = "off" (its cells then train one after another), or lower ' + turn
        else:
            turn = "lower " + turn
        out.append((knobs[0] if knobs else s.stage.split(" ")[0],
                    f"the {s.stage} stage would need {needs}. Mostly: {terms}. To fit, {turn}, or use a device "
                    f"with more memory; `ablate plan` prints every stage's estimate (docs/performance.md)."
                    + (" To check the spec for the GPU you will run it on instead, pass --memory-budget with that "
                       "card's memory (e.g. --memory-budget 16GiB)." if limit.device_type == "cpu" and not limit.budget
                       else "")))
    return out


def check(spec, limit: Limit, registry=None, source: str = "spec") -> list[StageMemory]:
    """The estimate for `limit`'s device type; SpecError (exit 2) naming each stage that does not
    fit, its largest terms and the knobs to turn."""
    stages = estimate(spec, limit.device_type, registry)
    found = problems(stages, limit)
    if found:
        raise SpecError(found, source)
    return stages


def check_run(ctx) -> None:
    """`ablate run`'s check (called from preflight): the run's device, or ctx.memory_budget."""
    if not getattr(ctx, "memory_check", True):
        return
    check(ctx.spec, limit_for(ctx.device, getattr(ctx, "memory_budget", None)), ctx.registry,
          f"spec {ctx.spec.name!r}")


def table_rows(stages: list[StageMemory]) -> list[dict[str, Any]]:
    """Rows for `ablate plan`: stage, host GiB, GPU GiB (peak reserved; None on the CPU), allocated
    GiB, the largest terms."""
    rows = []
    for s in stages:
        on = "device" if s.device_type == "cuda" and s.device else "host"
        rows.append({"stage": s.stage, "host_gib": s.host_bytes / GIB,
                     "gpu_gib": s.reserved_bytes / GIB if s.device_type == "cuda" else None,
                     "allocated_gib": s.allocated_bytes / GIB if s.device_type == "cuda" else None,
                     "largest": ", ".join(f"{t.short or t.what} {fmt_gib(t.bytes)}" for t in s.largest(on, 2))})
    return rows
