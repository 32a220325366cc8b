"""`ablate bench`: ablate's cell step and oracle pass, timed on the current device in one process.

Cell step: `CellRun.advance` (the step `ablate run` drives, log cadence included) against a naive
reference step written out plainly below: the same Student (eager), the same data, optimiser
and aux losses, but CE and KL from float32 full-vocabulary log-softmaxes of [B, T, V] tensors,
with the sidecar rows gathered for every position at once. Before timing, both compute the
loss of one batch from identical weights, so the comparison is of equal work.

Muon: the update alone, batched (one Newton–Schulz per shape group, the default) against the
per-matrix optimiser, on the same matrices and gradients (`bench_muon`).

Oracle pass: `ablate.oracle.build.accumulate` (teacher forward, hashing, sidecar and hidden-state
accumulation) with a randomly initialised TinyLlama-1.1B-shaped Llama in bf16, and the teacher
forward alone as its floor.

FLOPs (what MFU divides by the time and the bf16 dense peak) count matrix products only, as
2·m·n·k each; `cell_step_flops` and `teacher_flops_per_token` spell out which.
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.table import Table

from ablate.api.components import ObjectiveContext
from ablate.errors import InputError
from ablate.oracle.hashing import RowContract
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.logits import as_tensor
from ablate.model.student import EngramConfig, Student
from ablate.training.bench_fused import bench_fused
from ablate.training.bench_fused import table_row as fused_row
from ablate.training.bench_loss_head import bench_loss_head
from ablate.training.bench_loss_head import table_row as loss_head_row
from ablate.training.optim import CellOptimizer, wsd_multiplier
from ablate.training.train import (CellRun, TrainConfig, WindowSampler, aux_lambda, autocast_for,
                          compiled_canonical_rows, evaluate)

# bf16 dense tensor-core peaks (datasheet, SXM parts), for MFU; None elsewhere.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
REFERENCE_CELL_STEP_MS = 537.0  # the upstream implementation on an H100 (issue P6), not measured here
CELLS = (("router_off", 2), ("router_on", 4))  # ZEB-139: 2 CE cells, 4 KL+CE cells (λ 0.5 and 0.9)
STEPS_PER_CELL = 2000
EVAL_BATCHES_PER_CELL = 80  # evaluations at steps 250 … 1750 and after 2000, 10 batches each


@dataclass
class BenchSize:
    backbone: BackboneConfig
    engram: EngramConfig
    batch: int
    seq_len: int
    rows: int
    lam: float
    steps: int  # timed steps per cell measurement
    warmup: int  # untimed steps before (compilation happens here)
    stream_tokens: int
    teacher: dict  # LlamaConfig keyword arguments (vocab added from the backbone)
    oracle_batch: int
    oracle_seq_len: int
    oracle_batches: int  # timed teacher batches
    tolerance: dict = field(default_factory=lambda: {"fp32": 1e-4, "bf16": 2e-2})


SIZES = {
    "full": BenchSize(
        backbone=BackboneConfig(), engram=EngramConfig(router=True), batch=4, seq_len=2048,
        rows=10_000, lam=0.5, steps=30, warmup=10, stream_tokens=4_000_000,
        teacher=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, intermediate_size=5632),
        oracle_batch=16, oracle_seq_len=2048, oracle_batches=6),
    "small": BenchSize(
        backbone=BackboneConfig(vocab_size=512, hidden_dim=32, num_layers=8, num_query_heads=4,
                                num_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64),
        engram=EngramConfig(engram_dim=16, num_heads=4, top_k=4, router=True), batch=2, seq_len=32,
        rows=61, lam=0.5, steps=2, warmup=1, stream_tokens=4096,
        teacher=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64),
        oracle_batch=2, oracle_seq_len=32, oracle_batches=2),
}


# ------------------------------------------------------------------------------------ FLOPs


def cell_step_flops(size: BenchSize, router: bool = True) -> dict[str, float]:
    """Matrix-product FLOPs of one training step (forward + backward), by part.

    P = B·T positions. Backbone (frozen): every layer forward; backward only through the layers
    after the first injection, activation gradients only (no weight gradients), with flash
    attention's backward at 2.5× its forward (it recomputes QKᵀ). Causal attention counts half
    of the T² products. LM head and router head: forward, plus the input gradient (E is frozen).
    Engram (trainable): forward, backward at 2× (input and weight gradients); the fp32 top-k
    similarity search is forward only; the attention (W_q, W_k and W_v on the k gathered rows,
    scores, weighted values, W_o) runs twice with V-contrast. Router W_align: forward and 2×
    backward.
    """
    c, e = size.backbone, size.engram
    P, T, B = size.batch * size.seq_len, size.seq_len, size.batch
    d, V, N, E, k = c.hidden_dim, c.vocab_size, size.rows, e.engram_dim, e.top_k
    q_width, kv_width = c.num_query_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer_gemm = 2 * P * (d * q_width + 2 * d * kv_width + q_width * d + 3 * d * c.ffn_dim)
    layer_attn = 2 * B * c.num_query_heads * T * T * c.head_dim  # (QKᵀ + PV) · ½ causal
    grad_layers = c.num_layers - 1 - min(e.inject_layers)
    attend = (2 * P * d * d + 2 * 2 * P * k * E * d  # W_q; W_k and W_v on the P·k rows
              + 2 * 2 * P * k * d + 2 * P * d * d)  # scores and weighted values; W_o
    engram_fwd = 2 * P * d * E + 2 * attend  # W_r; the attention and its V-contrast twin
    search = 2 * P * E * N
    parts = {
        "backbone_forward": c.num_layers * (layer_gemm + layer_attn),
        "backbone_backward": grad_layers * (layer_gemm + 2.5 * layer_attn),
        "lm_head": 2 * (2 * P * d * V),
        "engram": len(e.inject_layers) * (search + 3 * engram_fwd),
    }
    if router:
        parts["router"] = 3 * (2 * P * d * d) + 2 * (2 * P * d * V)
    parts["total"] = sum(parts.values())
    return parts


def teacher_flops_per_token(teacher: dict, vocab: int, seq_len: int) -> float:
    """Llama forward FLOPs per token: 2·(layer weights + LM head) + causal attention."""
    h, L = teacher["hidden_size"], teacher["num_hidden_layers"]
    hd = h // teacher["num_attention_heads"]
    kv = teacher["num_key_value_heads"] * hd
    weights = L * (2 * h * h + 2 * h * kv + 3 * h * teacher["intermediate_size"]) + h * vocab
    return 2 * weights + L * 2 * teacher["num_attention_heads"] * seq_len * hd


# ----------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free what earlier measurements left: Python garbage and cached blocks. (Recorded CUDA
    graphs keep their memory pool for the rest of the process.)"""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(step: Callable[[int], object], warmup: int, steps: int,
               device: torch.device) -> dict[str, float]:
    """Run step(s) for s < warmup untimed, then `steps` timed (CUDA events on CUDA).

    Memory, over the timed steps, resident tensors included: peak_memory_gib is the allocator's
    peak of allocated memory; peak_reserved_gib the peak of reserved memory after the cache was
    emptied at the end of the warm-up, which also counts CUDA-graph memory pools (a replayed
    graph's intermediates are never allocated through the allocator, so the first figure does
    not see them).
    """
    _release(device)
    t0 = time.perf_counter()
    for s in range(warmup):
        step(s)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type != "cuda":
        t = time.perf_counter()
        for s in range(warmup, warmup + steps):
            step(s)
        return {"ms_per_step": 1000 * (time.perf_counter() - t) / steps, "peak_memory_gib": None,
                "peak_reserved_gib": None, "warmup_s": warmup_s}
    _release(device)  # compilation and warm-up leftovers
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in range(warmup, warmup + steps):
        step(s)
    end.record()
    end.synchronize()
    return {"ms_per_step": start.elapsed_time(end) / steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "warmup_s": warmup_s}


# ------------------------------------------------------------------------------ cell setup


@dataclass
class CellInputs:
    backbone_state: dict[str, torch.Tensor]
    table: torch.Tensor  # [N, E] on the device
    sidecar: torch.Tensor  # [N, V] float32 on the device
    train: torch.Tensor  # [S] int64 on the CPU
    val: torch.Tensor


def make_cell_inputs(size: BenchSize, device: torch.device, seed: int = 0) -> CellInputs:
    """Random backbone weights, table [N, E], sidecar [N, V] (teacher-like logit scale 3) and
    uniform token streams, all from `seed`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = Backbone(size.backbone)
    V = size.backbone.vocab_size
    return CellInputs(
        backbone_state={k: v.detach().clone() for k, v in backbone.state_dict().items()},
        table=torch.randn(size.rows, size.engram.engram_dim, generator=g).to(device),
        sidecar=(3 * torch.randn(size.rows, V, generator=g)).to(device),
        train=torch.randint(0, V, (size.stream_tokens,), generator=g),
        val=torch.randint(0, V, (size.stream_tokens // 4,), generator=g))


def make_student(size: BenchSize, inputs: CellInputs, device: torch.device, router: bool) -> Student:
    """A fresh student with the bench backbone and adapters initialised from seed 42."""
    backbone = Backbone(size.backbone)
    backbone.load_state_dict(inputs.backbone_state)
    torch.manual_seed(42)
    student = Student(backbone, replace(size.engram, router=router), inputs.table.cpu())
    student.freeze_backbone()
    return student.to(device)


def train_config(size: BenchSize, precision: str) -> TrainConfig:
    """ZEB-139's training config with the aux weights at full strength from step 1 and no
    evaluation inside the timed steps."""
    return TrainConfig(steps=size.warmup + size.steps, batch=size.batch, seq_len=size.seq_len,
                       warmup=1, aux_warmup=1, eval_every=10**9, precision=precision,
                       row_contract=RowContract(rows=size.rows, seed=42), name="bench")


def make_objective(size: BenchSize, inputs: CellInputs, router: bool):
    from ablate_builtins.objectives import CE, KLCE  # imported directly: no entry points needed

    ctx = ObjectiveContext(size.backbone.vocab_size,
                           torch.bincount(inputs.train, minlength=size.backbone.vocab_size).double())
    if router:
        return KLCE(KLCE.Params.model_validate({"lambda": size.lam}), ctx)
    return CE(CE.Params(), ctx)


class NaiveStep:
    """The plain reference step: same student, data, optimiser and aux losses; CE and forward
    KL(P_router‖P_teacher) from float32 log-softmaxes of whole [B, T, V] tensors, the sidecar
    rows of all B·T positions gathered at once."""

    def __init__(self, student: Student, inputs: CellInputs, cfg: TrainConfig, lam: float,
                 device: torch.device):
        self.student, self.sidecar, self.cfg, self.lam = student, inputs.sidecar, cfg, lam
        self.params = dict(student.trainable_named_parameters())
        # the per-matrix Muon (torch.optim.Muon), as before batching: the naive step stays the plain one
        self.optimizer = CellOptimizer(self.params.items(), cfg.lr, batched=False)
        self.sampler = WindowSampler(inputs.train, cfg.batch, cfg.seq_len, cfg.data_seed, device)
        self.autocast, _ = autocast_for(device, cfg.precision)

    def loss(self, s: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        rows = cfg.row_contract.rows_of(inputs)
        with self.autocast():
            out = self.student(inputs, aux=True)
        log_p = F.log_softmax(as_tensor(out.logits).float(), dim=-1)
        ce = F.nll_loss(log_p.flatten(0, 1), targets.flatten())
        log_r = F.log_softmax(as_tensor(out.router_logits).float(), dim=-1)
        log_t = F.log_softmax(self.sidecar[rows.clamp(min=0)].float(), dim=-1)
        kl_per_token = (log_r.exp() * (log_r - log_t)).sum(dim=-1)
        mask = (rows >= 0).float()
        kl = (kl_per_token * mask).sum() / mask.sum().clamp(min=1.0)
        return ((1 - self.lam) * ce + self.lam * kl
                + aux_lambda(s, cfg.vcontrast_weight, cfg.aux_warmup) * sum(out.vc.values())
                + aux_lambda(s, cfg.qdiv_weight, cfg.aux_warmup) * sum(out.qd.values()))

    def __call__(self, s: int) -> None:
        cfg = self.cfg
        self.optimizer.set_lr(cfg.lr * wsd_multiplier(s, cfg.steps, cfg.warmup, cfg.decay_frac))
        inputs, targets = self.sampler()
        self.loss(s, inputs, targets).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.params.values() if p.grad is not None],
                                       cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _throughput(timing: dict, size: BenchSize, flops: float, peak: float | None) -> dict:
    tokens = size.batch * size.seq_len
    seconds = timing["ms_per_step"] / 1000
    return {**timing, "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / peak if peak else None}


def bench_cells(size: BenchSize, device: torch.device, peak: float | None) -> dict:
    """The router-on KL+CE step, naive then ablate, each first computing the loss of one fixed
    batch from the same initial weights (the equal-work check); then ablate's evaluation batch
    and router-off CE step (for the full-matrix estimate)."""
    inputs = make_cell_inputs(size, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = train_config(size, precision)
    flops = cell_step_flops(size, router=True)
    batch = WindowSampler(inputs.train, cfg.batch, cfg.seq_len, 7, device)()

    naive = NaiveStep(make_student(size, inputs, device, True), inputs, cfg, size.lam, device)
    torch.manual_seed(1)
    naive_loss = naive.loss(cfg.aux_warmup, *batch).item()
    naive_t = _throughput(time_steps(naive, size.warmup, size.steps, device), size,
                          flops["total"], peak)
    del naive
    _release(device)

    run = CellRun(make_student(size, inputs, device, True), make_objective(size, inputs, True),
                  inputs.train, inputs.val, inputs.sidecar, cfg, device)
    torch.manual_seed(1)
    t = time.perf_counter()
    ablate_loss = run.losses(cfg.aux_warmup, *batch, log_step=False).loss.item()
    first_call_s = time.perf_counter() - t  # includes compiling the training graphs on CUDA
    rel = abs(ablate_loss - naive_loss) / max(abs(naive_loss), 1e-12)
    rows_equal = torch.equal(compiled_canonical_rows(batch[0], cfg.row_contract.rows, cfg.row_contract.seed),
                             cfg.row_contract.rows_of(batch[0]))
    check = {"ablate_loss": ablate_loss, "naive_loss": naive_loss, "relative_difference": rel,
             "tolerance": size.tolerance[precision], "kl_rows_equal": rows_equal,
             "first_call_s": first_call_s,
             "ok": rel <= size.tolerance[precision] and rows_equal}
    ablate_t = _throughput(time_steps(run.advance, size.warmup, size.steps, device), size,
                           flops["total"], peak)
    eval_t = time_steps(lambda s: evaluate(run.student, run.val_sampler, 1, run.autocast),
                        2, max(2, size.steps // 3), device)
    del run
    _release(device)

    off_flops = cell_step_flops(size, router=False)
    run = CellRun(make_student(size, inputs, device, False), make_objective(size, inputs, False),
                  inputs.train, inputs.val, None, cfg, device)
    off_t = _throughput(time_steps(run.advance, size.warmup, max(2, size.steps // 3), device),
                        size, off_flops["total"], peak)
    del run, inputs, batch
    _release(device)

    def ratio(key: str) -> float | None:
        return ablate_t[key] / naive_t[key] if naive_t[key] else None

    ratios = {"tokens_per_s": ablate_t["tokens_per_s"] / naive_t["tokens_per_s"],
              "peak_memory": ratio("peak_memory_gib"), "peak_reserved": ratio("peak_reserved_gib")}
    return {"precision": precision, "flops": flops, "flops_router_off": off_flops,
            "loss_check": check, "ablate": ablate_t, "naive": naive_t, "ratios": ratios,
            "router_off_ablate": off_t, "eval_ms_per_batch": eval_t["ms_per_step"],
            "eval_warmup_s": eval_t["warmup_s"]}


# ------------------------------------------------------------------------------------ Muon


def bench_muon(size: BenchSize, device: torch.device, steps: int | None = None) -> dict:
    """The Muon update alone (Adam and everything else left out) on the router-on student's Muon
    matrices, batched (one Newton–Schulz per shape group, the default) against per-matrix
    (torch.optim.Muon; ReferenceMuon under "upstream"), for each numerics: the same fixed gradients
    every step, the same number of steps, then the two parameter sets compared (equal work)."""
    from ablate.training.optim import BatchedMuon, partition

    torch.manual_seed(0)
    student = Student(Backbone(size.backbone), replace(size.engram, router=True),
                      torch.randn(size.rows, size.engram.engram_dim))
    student.freeze_backbone()
    named = [(n, p) for n, p in student.trainable_named_parameters()]
    matrices, _ = partition(named)
    names = {id(p): n for n, p in named}
    g = torch.Generator().manual_seed(1)
    init = [p.detach().to(device) for p in matrices]
    grads = [1e-3 * torch.randn(p.shape, generator=g).to(device) for p in matrices]
    n_steps = steps or max(size.steps, 2)
    result: dict = {"matrices": len(matrices),
                    "shape_groups": len(BatchedMuon.shape_groups(matrices)),
                    "shapes": sorted({tuple(p.shape) for p in matrices})}
    for numerics in ("ablate", "upstream"):
        timings, finals = {}, {}
        for kind, batched in (("batched", True), ("per_matrix", False)):
            params = [torch.nn.Parameter(t.clone()) for t in init]
            opt = CellOptimizer([(names[id(m)], p) for m, p in zip(matrices, params)], 9e-4, numerics,
                                batched=batched)

            def step(_s: int, opt=opt, params=params) -> None:
                for p, grad in zip(params, grads):
                    p.grad = grad
                opt.muon.step()

            timings[kind] = time_steps(step, size.warmup, n_steps, device)
            finals[kind] = [p.detach().double() for p in params]
        diffs = [float((b - s).norm() / (s - t.double()).norm().clamp(min=1e-30))
                 for b, s, t in zip(finals["batched"], finals["per_matrix"], init)]
        tolerance = 2e-5 if numerics == "upstream" else 1e-2  # float32 / bf16 Newton–Schulz
        result[numerics] = {
            "batched_ms_per_step": timings["batched"]["ms_per_step"],
            "per_matrix_ms_per_step": timings["per_matrix"]["ms_per_step"],
            "speedup": timings["per_matrix"]["ms_per_step"] / timings["batched"]["ms_per_step"],
            "max_relative_update_difference": max(diffs), "tolerance": tolerance, "ok": max(diffs) <= tolerance,
            "steps": size.warmup + n_steps}
    return result


# ---------------------------------------------------------------------------------- oracle


def bench_oracle(size: BenchSize, device: torch.device, peak: float | None) -> dict:
    """ablate.oracle.build.accumulate over random tokens with a random-weight Llama teacher (bf16 on
    CUDA), after one untimed warm-up batch; and the teacher forward alone over the same batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ablate.oracle.build import OracleConfig, accumulate
    from ablate_builtins.teachers import HFTeacherModel, resolve_layer

    V = size.backbone.vocab_size
    config = LlamaConfig(vocab_size=V, max_position_embeddings=size.oracle_seq_len,
                         tie_word_embeddings=False, **size.teacher)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    teacher = HFTeacherModel(model, resolve_layer(-2, config.num_hidden_layers, "the bench teacher"),
                             device, {"source": "bench (random weights)", "random_weights": True})
    cfg = OracleConfig(rows=size.rows, engram_dim=size.engram.engram_dim,
                       batch=size.oracle_batch, seq_len=size.oracle_seq_len)
    per_batch = size.oracle_batch * size.oracle_seq_len
    g = torch.Generator().manual_seed(3)
    stream = torch.randint(0, V, ((size.oracle_batches + 1) * per_batch,), generator=g)
    warm, timed = stream[:per_batch], stream[per_batch:]

    accumulate(teacher, warm, cfg, device)
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    _, _, n_tokens = accumulate(teacher, timed, cfg, device)
    _sync(device)
    seconds = time.perf_counter() - t
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    batches = timed.view(-1, size.oracle_batch, size.oracle_seq_len)
    _sync(device)
    t = time.perf_counter()
    for b in batches:
        hidden, logits = teacher.forward(b.to(device))
        del hidden, logits
    _sync(device)
    forward_s = time.perf_counter() - t
    del teacher, model
    _release(device)

    per_token = teacher_flops_per_token(size.teacher, V, size.oracle_seq_len)
    return {"tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds,
            "mfu": per_token * n_tokens / seconds / peak if peak else None,
            "teacher_forward_tokens_per_s": n_tokens / forward_s,
            "flops_per_token": per_token, "peak_memory_gib": peak_mem,
            "batch": size.oracle_batch, "seq_len": size.oracle_seq_len}


# ------------------------------------------------------------------------------- reporting


def full_matrix_estimate(cells: dict) -> dict:
    """ZEB-139's six cells at this size from the measured step and evaluation times; a second
    figure adds the warm-up measured here (mostly compilation: the first training call and
    warm-up steps with the router on and off, the first evaluations), paid once a process."""
    per = {"router_off": cells["router_off_ablate"]["ms_per_step"],
           "router_on": cells["ablate"]["ms_per_step"]}
    seconds = sum(n * (STEPS_PER_CELL * per[kind] + EVAL_BATCHES_PER_CELL
                       * cells["eval_ms_per_batch"]) for kind, n in CELLS) / 1000
    compile_s = (cells["loss_check"]["first_call_s"] + cells["ablate"]["warmup_s"]
                 + cells["router_off_ablate"]["warmup_s"] + 2 * cells["eval_warmup_s"])
    return {"seconds": seconds, "minutes": seconds / 60, "compile_seconds": compile_s,
            "minutes_with_compilation": (seconds + compile_s) / 60, "is_estimate": True,
            "formula": "Σ_cells 2000·ms_per_step(cell kind) + 80·eval_ms_per_batch; 2 router-off "
                       "CE cells, 4 router-on KL+CE cells; with compilation: + first_call_s + "
                       "warmup_s (router on, router off) + 2·eval warmup_s",
            "excluded": "the oracle pass, probes, report, process start and data loading"}


def _device_info(device: torch.device) -> tuple[dict, float | None]:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type != "cuda":
        info["name"] = platform.processor() or platform.machine()
        return info, None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    info.update(name=name, peak_bf16_tflops=peak / 1e12 if peak else None)
    return info, peak


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_table(result: dict) -> Table:
    cells = result["cells"]
    table = Table(title=f"ablate bench --size {result['size']} on {result['device']['name']}")
    for col in ("measurement", "ms/step", "tokens/s", "MFU", "peak GiB alloc / reserved", "vs naive"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    a, n, r = cells["ablate"], cells["naive"], cells["ratios"]

    def memory(m: dict) -> str:
        return f"{_fmt(m['peak_memory_gib'], '.2f')} / {_fmt(m['peak_reserved_gib'], '.2f')}"

    table.add_row("cell step, ablate", _fmt(a["ms_per_step"], ".2f"), _fmt(a["tokens_per_s"], ",.0f"),
                  _fmt(a["mfu"], ".1%"), memory(a),
                  f"{r['tokens_per_s']:.2f}× tok/s, {_fmt(r['peak_memory'], '.2f')} / "
                  f"{_fmt(r['peak_reserved'], '.2f')}× mem")
    table.add_row("cell step, naive reference", _fmt(n["ms_per_step"], ".2f"),
                  _fmt(n["tokens_per_s"], ",.0f"), _fmt(n["mfu"], ".1%"), memory(n), "1×")
    o = cells["router_off_ablate"]
    table.add_row("cell step, router off (CE)", _fmt(o["ms_per_step"], ".2f"),
                  _fmt(o["tokens_per_s"], ",.0f"), _fmt(o["mfu"], ".1%"), memory(o), "")
    mu = result.get("muon")
    for numerics, what in (("ablate", "bf16"), ("upstream", "float32")) if mu else ():
        m = mu[numerics]
        table.add_row(f"Muon step alone, batched ({mu['shape_groups']} groups, {what})",
                      _fmt(m["batched_ms_per_step"], ".3f"), "", "", "",
                      f"{m['speedup']:.2f}× vs per-matrix ({m['per_matrix_ms_per_step']:.3f} ms, "
                      f"{mu['matrices']} matrices){'' if m['ok'] else ', MISMATCH'}")
    if result.get("loss_head"):
        table.add_row(*loss_head_row(result["loss_head"]))
    if result.get("fused"):
        table.add_row(*fused_row(result["fused"]))
    if result.get("oracle"):
        q = result["oracle"]
        table.add_row("oracle pass (incl. hashing + accumulation)", "", _fmt(q["tokens_per_s"], ",.0f"),
                      _fmt(q["mfu"], ".1%"), f"{_fmt(q['peak_memory_gib'], '.2f')} / —", "")
        table.add_row("teacher forward alone", "", _fmt(q["teacher_forward_tokens_per_s"], ",.0f"),
                      "", "", "")
    est = result["full_matrix_estimate"]
    if "compile_seconds" in est:  # results written before the cold-start row lack it
        table.add_row("cold start (compilation, warm-up)", "", "", "", "",
                      f"router on {cells['loss_check']['first_call_s'] + a['warmup_s']:.1f} s, router off "
                      f"{o['warmup_s']:.1f} s, evaluation {cells['eval_warmup_s']:.1f} s: "
                      f"{est['compile_seconds']:.1f} s of the matrix")
    table.caption = (f"loss check: ablate {cells['loss_check']['ablate_loss']:.5f} vs naive "
                     f"{cells['loss_check']['naive_loss']:.5f} "
                     f"({'ok' if cells['loss_check']['ok'] else 'MISMATCH'}); ZEB-139 full matrix "
                     f"≈ {est['minutes']:.1f} min, {est['minutes_with_compilation']:.1f} min with "
                     f"compilation (estimates; without {est['excluded']})")
    return table


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("`ablate bench --device cuda` was asked for, but PyTorch sees no CUDA "
                         "device here; use --device cpu (with --size small) or run it on a GPU.")
    return torch.device(name)


def run_bench(size_name: str, device: torch.device, steps: int | None = None,
              oracle: bool = True) -> dict:
    size = SIZES[size_name]
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be at least 1 (got {steps}).")
        size = replace(size, steps=steps)
    info, peak = _device_info(device)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "size": size_name, "device": info,
              "dimensions": {"backbone": size.backbone.to_dict(), "engram": asdict(size.engram),
                             "batch": size.batch, "seq_len": size.seq_len, "rows": size.rows,
                             "lambda": size.lam, "timed_steps": size.steps,
                             "warmup_steps": size.warmup, "teacher": size.teacher}}
    result["cells"] = bench_cells(size, device, peak)
    result["muon"] = bench_muon(size, device)
    result["loss_head"] = bench_loss_head(size, device, time_steps, size.tolerance[result["cells"]["precision"]])
    result["fused"] = bench_fused(size, device, result["cells"])
    result["oracle"] = bench_oracle(size, device, peak) if oracle else None
    result["full_matrix_estimate"] = full_matrix_estimate(result["cells"])
    result["reference_cell_step_ms"] = REFERENCE_CELL_STEP_MS
    result["speedup_vs_reference"] = REFERENCE_CELL_STEP_MS / result["cells"]["ablate"]["ms_per_step"]
    return result


def bench_command(args, console) -> int:
    device = _resolve_device(args.device)
    result = run_bench(args.size, device, args.steps, oracle=not args.skip_oracle)
    result["command"] = (f"ablate bench --size {args.size} --device {args.device}"
                         + (f" --steps {args.steps}" if args.steps else "")
                         + (" --skip-oracle" if args.skip_oracle else ""))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(render_table(result))
    console.print(f"results: {args.out}")
    muon_ok = all(result["muon"][n]["ok"] for n in ("ablate", "upstream"))
    checks = (result["cells"]["loss_check"]["ok"], muon_ok, result["loss_head"]["ok"], result["fused"]["loss_check"]["ok"])
    return 0 if all(checks) else 1

