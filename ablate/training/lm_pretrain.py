"""A small, generic causal-LM pretraining loop (used by local teachers and the backbone stage).

The model is given as a logits function `forward(tokens [B, T]) -> logits [B, T, V]` plus its
parameters, so any module (a Hugging Face model, the ablate backbone) can be trained.

- Data: each step draws `batch` windows of seq_len + 1 consecutive tokens from the train stream
  at uniform start offsets (torch.Generator seeded `seed`); inputs = first seq_len tokens,
  targets = last seq_len.
- Optimiser: AdamW, betas (0.9, 0.95), eps 1e-8, weight decay on parameters with ≥ 2 dims only.
- Schedule: linear warmup over `warmup` steps (multiplier (step+1)/warmup), then
  "cosine": cosine decay from 1 to min_lr_ratio at the last step, or
  "wsd": flat at 1, then linear decay to min_lr_ratio over the last 10% of steps.
- Gradient clipping: global L2 norm ≤ clip.
- Validation: mean CE over every predicted token of fixed, non-overlapping windows of
  seq_len + 1 tiling the validation stream from its start (at most `val_tokens` tokens).
- Mixed precision: bf16 autocast on CUDA, fp32 elsewhere; the loss is computed in fp32.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F

from ablate.api.components import Progress, no_progress
from ablate.errors import DivergedError

CHECK_EVERY = 25  # steps between non-finite-loss checks (each one syncs the device)

Forward = Callable[[torch.Tensor], torch.Tensor]


def lr_multiplier(step: int, steps: int, warmup: int, schedule: Literal["cosine", "wsd"], min_ratio: float) -> float:
    """Learning-rate multiplier at 0-based `step` of `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, steps - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = steps - max(1, steps // 10)
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * (step - decay_start + 1) / (steps - decay_start)


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """stream [N] → [batch, seq_len + 1] windows at uniform random offsets."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


def validation_windows(val: torch.Tensor, seq_len: int, val_tokens: int) -> torch.Tensor:
    """val [M] → [n, L + 1] non-overlapping windows from the start, L = min(seq_len, M − 1)."""
    length = min(seq_len, val.numel() - 1)
    n = max(1, min(val_tokens, val.numel() - 1) // length)
    return torch.stack([val[i * length: i * length + length + 1] for i in range(n)])


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cross_entropy(forward: Forward, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE (fp32 scalar) of `forward` on windows [B, T+1]."""
    logits = forward(windows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(forward: Forward, windows: torch.Tensor, device: torch.device, batch: int) -> float:
    """Token-weighted mean CE over windows [n, T+1] (all windows have the same length)."""
    total = 0.0
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i: i + batch].to(device)
        with _autocast(device):
            total += cross_entropy(forward, chunk).item() * chunk.shape[0]
    return total / windows.shape[0]


def pretrain_lm(forward: Forward, parameters: Iterable[torch.nn.Parameter], train: torch.Tensor,
                val: torch.Tensor, *, steps: int, batch: int, seq_len: int, lr: float, warmup: int,
                seed: int, device: torch.device, progress: Progress = no_progress,
                schedule: Literal["cosine", "wsd"] = "cosine", min_lr_ratio: float = 0.1,
                weight_decay: float = 0.1, clip: float = 1.0, val_tokens: int = 65_536,
                modules: Iterable[torch.nn.Module] = (), name: str = "pretraining",
                lr_key: str = "lr") -> dict[str, float]:
    """Train in place for `steps` steps; returns {"val_loss", "train_loss", "train_tokens", "steps"}.

    train [N] / val [M] int64 streams (N > seq_len, M ≥ 2). `modules` are switched to train mode
    for the loop and back to eval mode at the end. train_loss = mean loss of the last
    max(1, steps // 10) steps. A non-finite loss raises DivergedError naming `name`, the step and
    the spec key `lr_key` to lower (checked every CHECK_EVERY steps, so the GPU is not synced
    on every step).
    """
    if steps < 1 or train.numel() <= seq_len:
        raise ValueError(f"train stream has {train.numel()} tokens; need more than seq_len={seq_len}, "
                         f"and steps ({steps}) must be ≥ 1")
    params = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(seed)
    train, val = train.cpu(), val.cpu()
    modules = list(modules)
    for m in modules:
        m.train()
    tail = max(1, steps // 10)
    recent: list[float] = []
    first_bad = torch.full((), steps, device=device)  # step of the first non-finite loss; steps = none yet

    def check() -> None:
        bad = int(first_bad)
        if bad < steps:
            raise DivergedError(f"{name}: the training loss became non-finite (NaN or inf) at step {bad} of "
                                f"{steps}, learning rate {lr}. Nothing of this stage was saved; the stages before it "
                                f"stay cached. Lower `{lr_key}` (or lengthen the warm-up) in the spec and run again.")

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step, steps, warmup, schedule, min_lr_ratio)
        windows = sample_windows(train, batch, seq_len, generator).to(device)
        with _autocast(device):
            loss = cross_entropy(forward, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss.detach()), steps, step))
        if step % CHECK_EVERY == CHECK_EVERY - 1 or step == steps - 1:
            check()
        if step >= steps - tail:
            recent.append(loss.item())
        progress(batch * seq_len)
    for m in modules:
        m.eval()
    val_loss = evaluate(forward, validation_windows(val, seq_len, val_tokens), device, batch)
    return {"val_loss": val_loss, "train_loss": sum(recent) / len(recent),
            "train_tokens": steps * batch * seq_len, "steps": steps}
