"""The teacher-derived oracle (reference §4): hashed-row means of teacher hidden states, reduced
to `engram_dim` by PCA, plus a sidecar of mean raw teacher logits per row (the KL target).

Pass: the train stream is cut into non-overlapping `seq_len` chunks, run through the teacher in
batches, and every (position p, order, seed) n-gram ending at p (§2.1) adds the teacher's hidden
state and logits at p to its hashed row. Sums live on the compute device and are divided once at
the end (§9 items 5–6).

Accumulation as a sparse product: the (row, position) pairs of a batch form a 0/1 matrix
Mᵀ [rows + 1, positions] (the extra row takes the pairs whose n-gram does not exist), and
sums += Mᵀ · values is one sparse-dense product (cuSPARSE on CUDA). Each output row is summed
in place, with no atomic updates to contend on the few rows many n-grams hash to; on an H100
this took 7 ms for a 16 × 2048 batch against 63 ms for one `index_add_` per (chunk, column).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from ablate.api.components import LoadedTeacher, Progress, no_progress
from ablate.config.spec import OracleSpec
from ablate.errors import InputError
from ablate.oracle.hashing import RowContract, row_ids

TABLE_FILE = "table.safetensors"
SIDECAR_FILE = "sidecar.safetensors"
STATS_FILE = "stats.json"
TABLE_KEY = "engram.weight"
COUNTS_KEY = "engram.counts"
SIDECAR_KEY = "teacher_logits.weight"
TWIN_DIR = "shuffled"  # a given shuffled twin, saved beside the oracle


class OracleConfig(OracleSpec):
    """The spec's [oracle] section as the oracle pass reads it (stages.oracle_config): OracleSpec's
    fields and validation, plus the accumulation chunk, the seed of the |cos| sample, and the numerics."""

    chunk: int = Field(32768, ge=1)  # positions per sparse accumulation product (bounds its temporaries)
    cos_seed: int = 0  # seed of the populated rows sampled for the pairwise |cos| statistics
    numerics: Literal["ablate", "upstream"] = "ablate"  # "upstream": float32 row means, IncrementalPCA (§11.4)


@dataclass
class Oracle:
    """table [rows, E] float32, sidecar [rows, V] float32, populated [rows] bool,
    counts [rows] int64 (row updates per row); all on CPU. Unpopulated rows are exactly 0.
    shuffled_twin: a given shuffled control (an imported reference twin, ablate.oracle.files),
    used instead of shuffled(oracle, shuffle_seed); None for a computed oracle."""

    table: torch.Tensor
    sidecar: torch.Tensor
    populated: torch.Tensor
    counts: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    shuffled_twin: Oracle | None = None

    @property
    def row_contract(self) -> RowContract:
        """The sidecar's row contract, as its stats record it (an oracle cached before the record
        existed: its rows and first hash seed, which are the same thing)."""
        recorded = self.stats.get("row_contract") or {"rows": self.table.shape[0], "seed": self.stats["hash_seeds"][0]}
        return RowContract.model_validate(recorded)


# ------------------------------------------------------------------------------ accumulation


@dataclass
class RowPairs:
    """The (row, position) pairs of P positions × C columns as a CSR matrix Mᵀ [n_rows + 1, P]:
    crow [n_rows + 2] row offsets, col [P·C] positions sorted by row, counts [n_rows + 1] pairs
    per row. Row id −1 (no n-gram) maps to the extra row n_rows."""

    crow: torch.Tensor
    col: torch.Tensor
    counts: torch.Tensor
    n_rows: int
    positions: int

    @classmethod
    def of(cls, rows: torch.Tensor, n_rows: int) -> RowPairs:
        """rows [P, C] int64 in [0, n_rows) or −1. Sorting and offsets stay on rows' device."""
        positions, columns = rows.shape
        flat = torch.where(rows < 0, n_rows, rows).reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.searchsorted(flat[order], torch.arange(n_rows + 2, device=rows.device))
        col = (torch.arange(positions * columns, device=rows.device) // columns)[order]
        return cls(crow, col, crow[1:] - crow[:-1], n_rows, positions)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """Mᵀ as a sparse CSR tensor of ones, [n_rows + 1, P] in `dtype`."""
        with warnings.catch_warnings():  # "CSR support is in beta" and the invariant-check note
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, torch.ones_like(self.col, dtype=dtype),
                                           size=(self.n_rows + 1, self.positions), check_invariants=False)


class RowAccumulator:
    """Per-row sums and counts: sum [n_rows, dim] in `dtype` and counts [n_rows] int64 on
    `device`. One extra hidden row absorbs the row id −1 (no n-gram), so callers never gather."""

    def __init__(self, n_rows: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float64):
        self.n_rows = n_rows
        self.dim = dim
        self.dtype = dtype
        self.sums = torch.zeros(n_rows + 1, dim, dtype=dtype, device=device)
        self.counts = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)

    def add(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """rows [K] int64 in [0, n_rows) or −1 (ignored); values [K, dim] (cast to `dtype`)."""
        index = torch.where(rows < 0, self.n_rows, rows).to(self.sums.device)
        self.sums.index_add_(0, index, values.to(device=self.sums.device, dtype=self.dtype))
        self.counts.index_add_(0, index, torch.ones_like(index))

    def add_pairs(self, pairs: RowPairs, values: torch.Tensor) -> None:
        """values [P, dim] (cast to `dtype`) added to every row paired with each position:
        sums += Mᵀ · values, one sparse product; the same sums as `add` once per column."""
        values = values.to(device=self.sums.device, dtype=self.dtype)
        self.sums.addmm_(pairs.matrix(self.dtype), values)
        self.counts += pairs.counts

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [n_rows, dim] float32, populated [n_rows] bool); unpopulated rows are 0."""
        counts = self.counts[: self.n_rows]
        populated = counts > 0
        mean = self.sums[: self.n_rows] / counts.clamp(min=1).unsqueeze(1).to(self.dtype)
        mean = torch.where(populated.unsqueeze(1), mean, torch.zeros((), dtype=self.dtype, device=mean.device))
        return mean.to(torch.float32), populated

    def row_counts(self) -> torch.Tensor:
        """[n_rows] int64 updates per row."""
        return self.counts[: self.n_rows]


# ---------------------------------------------------------------------------------------- PCA


@dataclass
class PCA:
    """mean [D] float64, components [k, D] float64 (orthonormal rows); or a fitted scikit-learn
    IncrementalPCA (`fitted`, numerics = "upstream") whose own transform projects."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio_total: float
    fitted: Any = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] → (x − mean) @ componentsᵀ, [N, k] float64 (scikit-learn's transform of float32
        x, as the reference projects, when `fitted`)."""
        if self.fitted is not None:
            return torch.from_numpy(self.fitted.transform(x.detach().to("cpu", torch.float32).numpy()))
        return (x.to(torch.float64) - self.mean) @ self.components.T


def pca_subset(n_rows: int, sample_min: int, sample_frac: float, seed: int) -> np.ndarray:
    """Indices of the PCA fit subset: max(sample_min, min(P, ⌊frac·P⌋)) capped at P rows, drawn
    without replacement with numpy default_rng(seed), in draw order (§4.3)."""
    size = min(n_rows, max(sample_min, min(n_rows, math.floor(sample_frac * n_rows))))
    return np.random.default_rng(seed).choice(n_rows, size=size, replace=False)


def fit_incremental_pca(rows: torch.Tensor, n_components: int, sample_min: int, sample_frac: float, seed: int,
                        batch: int = 512) -> PCA:
    """The reference's PCA (numerics = "upstream"): scikit-learn's IncrementalPCA on the same
    subset as fit_pca, as float32, partial fits of `batch` rows in subset order, a final chunk
    shorter than n_components dropped (§4.3, §11.4)."""
    try:
        from sklearn.decomposition import IncrementalPCA
    except ImportError as exc:
        raise InputError('numerics = "upstream" fits the oracle PCA with scikit-learn\'s IncrementalPCA, which is '
                         "not installed. Install it with: pip install 'ablate[upstream]' (or pip install "
                         'scikit-learn), or use numerics = "ablate".') from exc
    subset = rows.detach().to("cpu", torch.float32).numpy()[pca_subset(rows.shape[0], sample_min, sample_frac, seed)]
    _check_pca_size(len(subset), rows.shape[1], n_components)
    ipca = IncrementalPCA(n_components=n_components)
    for start in range(0, len(subset), batch):
        chunk = subset[start:start + batch]
        if len(chunk) < n_components:
            break
        ipca.partial_fit(chunk)
    return PCA(mean=torch.from_numpy(np.asarray(ipca.mean_, dtype=np.float64)),
               components=torch.from_numpy(np.asarray(ipca.components_, dtype=np.float64)),
               explained_variance_ratio_total=float(ipca.explained_variance_ratio_.sum()), fitted=ipca)


def _check_pca_size(size: int, dim: int, n_components: int) -> None:
    if n_components > min(size, dim):
        raise InputError(
            f"PCA to engram_dim={n_components} needs at least {n_components} populated oracle rows and a "
            f"teacher hidden size of at least {n_components}, but the fit subset has {size} row(s) of "
            f"dimension {dim}. Use a larger corpus (or max_tokens), more rows, a wider teacher, or a "
            "smaller engram_dim."
        )


def fit_pca(rows: torch.Tensor, n_components: int, sample_min: int, sample_frac: float, seed: int) -> PCA:
    """Fit a k-component PCA on a random subset of rows [P, D].

    Subset size max(sample_min, min(P, ⌊frac·P⌋)) capped at P, drawn without replacement with
    numpy default_rng(seed). Deviation from upstream: exact PCA by SVD of the centred subset in
    float64 instead of sklearn's IncrementalPCA with partial-fit batches of 512 (same subspace up
    to the incremental approximation; no dropped final chunk). Component signs are fixed so each
    component's largest-magnitude entry is positive. The explained-variance ratio total is
    Σ top-k σ² / Σ all σ².
    """
    pick = pca_subset(rows.shape[0], sample_min, sample_frac, seed)
    size = len(pick)
    _check_pca_size(size, rows.shape[1], n_components)
    subset = rows.detach().to("cpu", torch.float64)[torch.from_numpy(pick)]
    mean = subset.mean(dim=0)
    _, sigma, vh = torch.linalg.svd(subset - mean, full_matrices=False)
    variance = sigma.square()
    total = variance.sum().item()
    if total <= 0.0:
        raise InputError(
            f"All {size} populated oracle rows sampled for the PCA fit are identical, so the teacher's "
            "hidden states carry no variation to project. Check the teacher (a constant or untrained "
            "hidden layer) and the configured layer."
        )
    components = vh[:n_components]
    peak = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, peak.unsqueeze(1)))
    return PCA(mean=mean, components=components * signs,
               explained_variance_ratio_total=variance[:n_components].sum().item() / total)


# ------------------------------------------------------------------------------- oracle pass


def _sequences(stream: torch.Tensor, cfg: OracleConfig) -> list[torch.Tensor]:
    """The stream cut into [b, T] batches: full seq_len chunks (ragged tail dropped), limited to
    max_tokens (a final partial sequence makes up the exact count)."""
    n_full = stream.numel() // cfg.seq_len
    if n_full == 0:
        raise InputError(
            f"The oracle's seq_len ({cfg.seq_len}) is longer than the corpus's train stream "
            f"({stream.numel()} tokens), so not even one sequence can be cut. Lower oracle.seq_len "
            "or use a larger corpus."
        )
    budget = n_full * cfg.seq_len if cfg.max_tokens is None else min(n_full * cfg.seq_len, cfg.max_tokens)
    whole, rest = divmod(budget, cfg.seq_len)
    seqs = stream[: whole * cfg.seq_len].view(whole, cfg.seq_len)
    batches = [seqs[i:i + cfg.batch] for i in range(0, whole, cfg.batch)]
    if rest:
        batches.append(stream[whole * cfg.seq_len: budget].view(1, rest))
    return batches


def _check_outputs(teacher: LoadedTeacher, tokens: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    b, t = tokens.shape
    if tuple(hidden.shape) != (b, t, teacher.hidden_size) or tuple(logits.shape) != (b, t, teacher.vocab_size):
        raise InputError(
            f"Teacher {teacher.info.get('source', type(teacher).__name__)!r} returned hidden "
            f"{tuple(hidden.shape)} and logits {tuple(logits.shape)} for tokens {(b, t)}; expected "
            f"{(b, t, teacher.hidden_size)} and {(b, t, teacher.vocab_size)} (its declared hidden_size "
            "and vocab_size). Fix the teacher plugin's forward or its declared sizes."
        )


class NextTokenScore:
    """The teacher's next-token cross-entropy and top-1 accuracy on the tokens it reads, from the
    logits the oracle pass already has (no extra forward). Sums stay on the logits' device
    (nll float64, correct int64; no host sync per batch); `stats()` reads them once at the end."""

    def __init__(self, device: torch.device | str, chunk: int = 4096):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0
        self.chunk = chunk  # positions per log-sum-exp, bounding its [chunk, V] temporary

    def add(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits [B, T, V] at each position t scored against the next token tokens[:, t + 1]
        (tokens [B, T] int64): B·(T − 1) predictions per batch."""
        b, t = tokens.shape
        targets = tokens[:, 1:].to(logits.device)
        for i in range(b):
            for start in range(0, t - 1, self.chunk):
                z = logits[i, start:min(start + self.chunk, t - 1)]  # [n, V], a contiguous view
                y = targets[i, start:start + z.shape[0]]  # [n]
                top, argmax = z.max(dim=1)  # [n]: the log-sum-exp's shift and the top-1 prediction
                lse = top + (z - top.unsqueeze(1)).exp_().sum(dim=1).log()
                self.nll += (lse - z.gather(1, y.unsqueeze(1)).squeeze(1)).sum(dtype=torch.float64)
                self.correct += (argmax == y).sum()
        self.count += b * (t - 1)

    def stats(self) -> dict[str, Any]:
        """teacher_ce (nats per token), teacher_top1 (fraction), teacher_tokens (predictions)."""
        n = self.count
        return {"teacher_ce": self.nll.item() / n if n else None,
                "teacher_top1": self.correct.item() / n if n else None, "teacher_tokens": n}


def accumulate(teacher: LoadedTeacher, stream: torch.Tensor, cfg: OracleConfig, device: torch.device | str,
               progress: Progress = no_progress, score: NextTokenScore | None = None
               ) -> tuple[RowAccumulator, RowAccumulator, int]:
    """Run the teacher over the stream [N] int64 and sum its outputs per hashed row.

    Returns (hidden accumulator [rows, H] float64 sums, sidecar accumulator [rows, V] float32
    sums, tokens processed). Both live on `device`. With `score`, the teacher's next-token
    predictions on the same batches are scored into it.
    """
    hidden_acc = RowAccumulator(cfg.rows, teacher.hidden_size, device, torch.float64)
    sidecar_acc = RowAccumulator(cfg.rows, teacher.vocab_size, device, torch.float32)
    n_tokens = 0
    for batch in _sequences(stream, cfg):
        tokens = batch.to(device=device, dtype=torch.int64)
        with torch.inference_mode():
            hidden, logits = teacher.forward(tokens)
            _check_outputs(teacher, tokens, hidden, logits)
            if score is not None:
                score.add(logits, tokens)
            rows = row_ids(tokens, cfg.rows, cfg.seeds, cfg.orders).flatten(0, 1)  # [B·T, C]
            hidden_flat = hidden.flatten(0, 1)
            logits_flat = logits.flatten(0, 1)
            for start in range(0, rows.shape[0], cfg.chunk):
                stop = start + cfg.chunk
                pairs = RowPairs.of(rows[start:stop], cfg.rows)
                hidden_acc.add_pairs(pairs, hidden_flat[start:stop])
                sidecar_acc.add_pairs(pairs, logits_flat[start:stop])
                del pairs
        del hidden, logits, hidden_flat, logits_flat
        n_tokens += tokens.numel()
        progress(tokens.numel())
    return hidden_acc, sidecar_acc, n_tokens


def _pairwise_abs_cos(table: torch.Tensor, populated: torch.Tensor, sample: int, seed: int) -> dict[str, float | None]:
    """median / mean / p90 of |cos| over distinct pairs of up to `sample` populated rows."""
    index = populated.nonzero().squeeze(1)
    if index.numel() < 2:
        return {"median": None, "mean": None, "p90": None}
    pick = index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed))[:sample]]
    x = table[pick].to(torch.float64)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
    i, j = torch.triu_indices(len(pick), len(pick), offset=1)
    cos = (x @ x.T)[i, j].abs().numpy()
    return {"median": float(np.median(cos)), "mean": float(cos.mean()), "p90": float(np.percentile(cos, 90))}


def assemble_oracle(hidden_acc: RowAccumulator, sidecar_acc: RowAccumulator, cfg: OracleConfig,
                    stats: dict[str, Any]) -> Oracle:
    """Means → PCA table and sidecar; `stats` (teacher, tokens, timing, ...) is extended."""
    hidden_mean, populated = hidden_acc.mean()
    sidecar, sidecar_populated = sidecar_acc.mean()
    if not torch.equal(populated.cpu(), sidecar_populated.cpu()):
        raise InputError(
            f"The oracle's hidden table populates {int(populated.sum())} rows but the teacher-logits sidecar "
            f"populates {int(sidecar_populated.sum())}, or different rows: the two must come from the same "
            "row updates. Nothing was written; this is a bug in the oracle pass — report it."
        )
    populated = populated.cpu()
    hidden_mean = hidden_mean.cpu()
    counts = hidden_acc.row_counts().cpu()
    if not populated.any():
        raise InputError("The oracle pass populated no rows: the stream has no n-grams. Use a longer seq_len or corpus.")
    if cfg.numerics == "upstream":  # the reference stores the row means as float32, then fits scikit-learn's PCA
        hidden_mean = hidden_mean.float()
    fit = fit_incremental_pca if cfg.numerics == "upstream" else fit_pca
    pca = fit(hidden_mean[populated], cfg.engram_dim, cfg.pca_sample_min, cfg.pca_sample_frac, cfg.pca_seed)
    table = torch.zeros(cfg.rows, cfg.engram_dim, dtype=torch.float32)
    table[populated] = pca.project(hidden_mean[populated]).to(torch.float32)
    observed = counts[populated].to(torch.float64)
    n_populated = int(populated.sum())
    stats = dict(stats)
    stats.update(
        total_entries=int(counts.sum()),
        engram_dim=cfg.engram_dim,
        hash_seeds=list(cfg.seeds),
        orders=list(cfg.orders),
        rows=cfg.rows,
        row_contract=RowContract(rows=cfg.rows, seed=cfg.seeds[0]).model_dump(),
        populated_rows=n_populated,
        populated_fraction=n_populated / cfg.rows,
        pca_explained_variance_ratio_total=pca.explained_variance_ratio_total,
        pairwise_abs_cos=_pairwise_abs_cos(table, populated, cfg.cos_sample, cfg.cos_seed),
        observations_per_row={"mean": float(observed.mean()), "min": int(observed.min()), "max": int(observed.max())},
    )
    return Oracle(table=table, sidecar=sidecar.cpu(), populated=populated, counts=counts, stats=stats)


def build_oracle(teacher: LoadedTeacher, stream: torch.Tensor, cfg: OracleConfig, device: torch.device | str,
                 progress: Progress = no_progress) -> Oracle:
    """The whole oracle pass: teacher over stream [N] int64 → Oracle (tensors on CPU).
    `seconds` and `tokens_per_s` time the teacher pass (PCA excluded); teacher_ce, teacher_top1
    and teacher_tokens score the teacher's next-token predictions on the tokens it read."""
    t0 = time.perf_counter()
    score = NextTokenScore(device)
    hidden_acc, sidecar_acc, n_tokens = accumulate(teacher, stream, cfg, device, progress, score)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    stats = {"teacher": dict(teacher.info), "layer": teacher.info.get("layer"), "tokens": n_tokens,
             "seconds": seconds, "tokens_per_s": n_tokens / seconds if seconds > 0 else None, **score.stats()}
    return assemble_oracle(hidden_acc, sidecar_acc, cfg, stats)


# ---------------------------------------------------------------------------------- controls


def shuffled(oracle: Oracle, seed: int) -> Oracle:
    """One permutation π = randperm(rows) from a CPU generator seeded `seed`, applied to table,
    sidecar, populated and counts alike: shuffled[i] = original[π[i]] (§4.5)."""
    perm = torch.randperm(oracle.table.shape[0], generator=torch.Generator().manual_seed(seed))
    return Oracle(table=oracle.table[perm], sidecar=oracle.sidecar[perm], populated=oracle.populated[perm],
                  counts=oracle.counts[perm], stats={**oracle.stats, "shuffle_seed": seed})


def gaussian_twin(table: torch.Tensor, seed: int) -> torch.Tensor:
    """A Gaussian table [rows, E] float32 with the per-dimension mean and (population) std of
    `table`, drawn from a CPU generator seeded `seed`: the content-destroying control (§7.5 X)."""
    t = table.detach().to("cpu", torch.float64)
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (noise * t.std(dim=0, correction=0) + t.mean(dim=0)).to(torch.float32)


# ---------------------------------------------------------------------------------- artifacts


def _replace_atomically(directory: Path, name: str, write) -> None:
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, directory / name)


def _check_shapes(table: torch.Tensor, sidecar: torch.Tensor, counts: torch.Tensor, where: str) -> None:
    if table.dim() != 2 or table.dtype != torch.float32 or sidecar.dim() != 2 or sidecar.dtype != torch.float32:
        raise InputError(
            f"Oracle {where}: the table must be a 2-D float32 tensor and the sidecar too, got table "
            f"{tuple(table.shape)} {table.dtype} and sidecar {tuple(sidecar.shape)} {sidecar.dtype}. "
            "Delete the oracle artifact; it will be recomputed."
        )
    if sidecar.shape[0] != table.shape[0] or tuple(counts.shape) != (table.shape[0],) or counts.dtype != torch.int64:
        raise InputError(
            f"Oracle {where}: the sidecar has {sidecar.shape[0]} rows but the table has {table.shape[0]} "
            f"(row counts: {tuple(counts.shape)} {counts.dtype}); they must agree. Delete the oracle "
            "artifact; it will be recomputed."
        )


def save_oracle(oracle: Oracle, directory: Path | str) -> None:
    """Write sidecar.safetensors, table.safetensors (engram.weight + engram.counts), then
    stats.json, each to a temporary name renamed into place (sidecar first, stats last); a
    shuffled twin goes to the subdirectory shuffled/ in the same layout."""
    directory = Path(directory)
    if oracle.shuffled_twin is not None:
        save_oracle(oracle.shuffled_twin, directory / TWIN_DIR)
    _check_shapes(oracle.table, oracle.sidecar, oracle.counts, f"to save in {directory}")
    if not torch.equal(oracle.populated, oracle.counts > 0):
        raise InputError(f"Oracle to save in {directory}: the populated mask disagrees with the row counts.")
    directory.mkdir(parents=True, exist_ok=True)
    _replace_atomically(directory, SIDECAR_FILE,
                        lambda p: save_file({SIDECAR_KEY: oracle.sidecar.contiguous()}, str(p)))
    _replace_atomically(directory, TABLE_FILE, lambda p: save_file(
        {TABLE_KEY: oracle.table.contiguous(), COUNTS_KEY: oracle.counts.contiguous()}, str(p)))
    text = json.dumps(oracle.stats, indent=2, sort_keys=True)
    _replace_atomically(directory, STATS_FILE, lambda p: p.write_text(text))


def _read(path: Path, reader):
    if not path.is_file():
        raise InputError(f"Oracle artifact {path} does not exist. Delete the oracle directory; it will be recomputed.")
    try:
        return reader(path)
    except Exception as exc:  # safetensors/json raise assorted types on damaged files
        raise InputError(f"corrupt artifact {path} ({exc}). Delete it; it will be recomputed.") from exc


def _tensor(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise InputError(f"corrupt artifact {path}: no tensor {key!r}. Delete it; it will be recomputed.")
    return tensors[key]


def load_oracle(directory: Path | str) -> Oracle:
    """Read an oracle written by `save_oracle` (its shuffled/ twin too, when present); missing,
    corrupt or inconsistent files → InputError."""
    directory = Path(directory)
    twin = load_oracle(directory / TWIN_DIR) if (directory / TWIN_DIR).is_dir() else None
    table_path, sidecar_path, stats_path = directory / TABLE_FILE, directory / SIDECAR_FILE, directory / STATS_FILE
    table_file = _read(table_path, lambda p: load_file(str(p)))
    sidecar_file = _read(sidecar_path, lambda p: load_file(str(p)))
    stats = _read(stats_path, lambda p: json.loads(p.read_text()))
    table, counts = _tensor(table_file, TABLE_KEY, table_path), _tensor(table_file, COUNTS_KEY, table_path)
    sidecar = _tensor(sidecar_file, SIDECAR_KEY, sidecar_path)
    _check_shapes(table, sidecar, counts, f"in {directory}")
    return Oracle(table=table, sidecar=sidecar, populated=counts > 0, counts=counts, stats=stats, shuffled_twin=twin)
