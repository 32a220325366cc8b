"""Vectorised XXH64 of token n-grams, and the hashed oracle rows they index (reference §2.1–2.2).

An n-gram of order n (2 or 3) is hashed as standard XXH64 over its token ids written as
consecutive little-endian unsigned 32-bit integers (8 or 12 bytes). The uint64 arithmetic is
done in int64 tensors: addition and multiplication wrap modulo 2^64 in two's complement, which
is exactly uint64 arithmetic; only right shifts need care (`>>` on int64 is arithmetic, so the
sign-extended high bits are masked off). Works on CPU and CUDA tensors alike.

Attribution: the n-gram ending at position p (tokens p−n+1 … p) belongs to p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from ablate.errors import InputError

DEFAULT_SEEDS: tuple[int, ...] = (42, 99, 137, 251)
DEFAULT_ORDERS: tuple[int, ...] = (2, 3)

_U64 = 1 << 64
_U32_MASK = 0xFFFFFFFF

PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME64_4 = 0x85EBCA77C2B2AE63
PRIME64_5 = 0x27D4EB2F165667C5


def _signed(value: int) -> int:
    """The int64 bit pattern (as a Python int) of an unsigned 64-bit value, reduced mod 2^64."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


_P1, _P2, _P3, _P4 = (_signed(p) for p in (PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of the uint64 held in an int64 tensor (0 < bits < 64)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _rotl(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x << bits) | _shr(x, 64 - bits)


def _u32(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids as unsigned 32-bit values (the little-endian u32 the reference writes)."""
    return tokens.to(torch.int64) & _U32_MASK


def _xxh64_short(lanes64: list[torch.Tensor], tail32: torch.Tensor | None, n_bytes: int,
                 seed: int) -> torch.Tensor:
    """XXH64 for inputs under 32 bytes made of 8-byte lanes and an optional 4-byte tail.

    lanes64: int64 tensors of one shape holding the 64-bit little-endian lanes, in order;
    tail32: same shape, the final u32 (or None). Returns the hash bit pattern as int64.
    """
    acc = torch.full_like(lanes64[0], _signed(seed + PRIME64_5 + n_bytes))
    for lane in lanes64:
        k1 = _rotl(lane * _P2, 31) * _P1  # round(0, lane)
        acc = _rotl(acc ^ k1, 27) * _P1 + _P4
    if tail32 is not None:
        acc = _rotl(acc ^ (tail32 * _P1), 23) * _P2 + _P3
    acc = acc ^ _shr(acc, 33)
    acc = acc * _P2
    acc = acc ^ _shr(acc, 29)
    acc = acc * _P3
    return acc ^ _shr(acc, 32)


def ngram_hashes(tokens: torch.Tensor, order: int, seed: int) -> torch.Tensor:
    """XXH64 of the n-gram ending at each position.

    tokens [B, T] int64 (ids in [0, 2^32)); order 2 or 3; seed a Python int in [0, 2^64).
    Returns [B, T] int64 holding the uint64 hash bit pattern. Positions p < order − 1 have no
    n-gram and hold 0 (undefined: mask them, see `row_ids`).
    """
    if order not in (2, 3):
        raise ValueError(f"n-gram order must be 2 or 3, got {order}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    u = _u32(tokens)
    out = torch.zeros_like(u)
    length = u.shape[1] - (order - 1)
    if length <= 0:
        return out
    first = u[:, 0:length] | (u[:, 1:1 + length] << 32)
    tail = u[:, 2:2 + length] if order == 3 else None
    out[:, order - 1:] = _xxh64_short([first], tail, 4 * order, seed)
    return out


def unsigned_mod(h: torch.Tensor, n_rows: int) -> torch.Tensor:
    """h mod n_rows with h's int64 bit pattern read as uint64. Returns int64 in [0, n_rows).

    Split as h = hi·2^32 + lo so every intermediate stays below 2^63 (needs n_rows ≤ 2^31).
    """
    if not 1 <= n_rows <= 1 << 31:
        raise InputError(
            f"the number of oracle rows must be between 1 and 2^31, got {n_rows}; set the "
            "oracle's row count to a positive number (the reference uses 10,000)."
        )
    hi = _shr(h, 32)
    lo = h & _U32_MASK
    return ((hi % n_rows) * ((1 << 32) % n_rows) + lo % n_rows) % n_rows


def row_ids(tokens: torch.Tensor, n_rows: int, seeds: Sequence[int] = DEFAULT_SEEDS,
            orders: Sequence[int] = DEFAULT_ORDERS) -> torch.Tensor:
    """Hashed oracle rows of every (order, seed) n-gram ending at each position.

    tokens [B, T] int64 → [B, T, len(orders)·len(seeds)] int64; column index
    i_order·len(seeds) + i_seed. −1 where the n-gram does not exist (p < order − 1).
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    columns = []
    for order in orders:
        missing = positions < order - 1
        for seed in seeds:
            rows = unsigned_mod(ngram_hashes(tokens, order, seed), n_rows)
            columns.append(rows.masked_fill(missing, -1))
    return torch.stack(columns, dim=-1)


def canonical_rows(tokens: torch.Tensor, n_rows: int, seed: int = DEFAULT_SEEDS[0]) -> torch.Tensor:
    """The KL-target row of each position (§2.2): the trigram ending at p hashed with the first
    seed. tokens [B, T] int64 → [B, T] int64, −1 at p < 2."""
    return row_ids(tokens, n_rows, seeds=(seed,), orders=(3,))[..., 0]


class RowContract(BaseModel):
    """Which sidecar row a position reads (§2.2): the trigram ending at it hashed with `seed`, mod
    `rows`. The oracle records it (Oracle.row_contract); the loss and the probes read it there."""

    model_config = ConfigDict(frozen=True)
    rows: int = Field(ge=1)
    seed: int

    def rows_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 → sidecar rows [B, T] int64, −1 at p < 2."""
        return canonical_rows(tokens, self.rows, self.seed)
