"""The rest of the η-B capgap battery (zeb139-experiment.md §7.5): W, A, X, Q and V per injection
layer. D/P/E/M are probes.RetrievalBattery and C is probes.CrossRun; the rubric that reads them
all is ablate.verdicts.verdict.BATTERY_RUBRIC.

Every statistic is computed on one probe batch (N = B·T tokens) and averaged over the batches,
as D/P/E/M are. The hidden state h_in [B, T, d] each injection reads and its injection
inj = tanh(a)·xattn(h_in) [B, T, d] (gate included) come from the student's traced forward; X
recomputes the injection on the captured h_in against another table (StudentView.inject). No hook
is installed. Probes run with inject_mult = 1, so the zero-injection multiplier is 1 throughout.
Like every plugin, this module imports only ablate.api (and the sibling built-in probes module).
"""

from __future__ import annotations

import math

import torch

from ablate.api import CellView, InjectionTrace, Metric, Params, Probe, StudentView, gaussian_twin
from ablate_builtins.probes import COS_EPS, cosine, mean, measuring, traced


# ----------------------------------------------------------------------------- statistics


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, d] → unit rows in float64; a zero row stays zero."""
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)


def concentration(x: torch.Tensor) -> tuple[float, float]:
    """W of vectors x [N, d] → (R, axis RMS).

    R = ‖(1/N) Σ_i u_i‖ with u the unit rows (signed concentration, in [0, 1]).
    axis RMS = √((1/N²) Σ_{i,j} cos²(x_i, x_j)) over all N² ordered pairs (self-pairs included),
    computed with the d×d Gram trick Σ_{i,j} (u_i·u_j)² = ‖UᵀU‖_F², never an N×N matrix."""
    u = unit_rows(x)
    return float(u.mean(0).norm()), float(torch.linalg.matrix_norm(u.T @ u) / u.shape[0])


def cos_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Row-wise cosines of a, b [N, d] → (mean signed, mean absolute)."""
    c = cosine(a, b)
    return float(c.mean()), float(c.abs().mean())


def swap_floor(x: torch.Tensor, generator: torch.Generator) -> float:
    """Mean |cos| between each row of x [N, d] (N ≥ 2) and another row: the rows are visited in
    a random order π (drawn from `generator`) and row π[i] is paired with row π[i+1] (cyclically),
    so every row meets exactly one other row and never itself."""
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return float(cosine(x[perm], x[perm.roll(-1)]).abs().mean())


def distinct_pairs(n: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random pairs (i, j) of distinct token positions in [0, n), n ≥ 2 → two [count]
    int64 tensors: i uniform, j uniform over the other n − 1 positions."""
    i = torch.randint(n, (count,), generator=generator)
    j = (i + torch.randint(1, n, (count,), generator=generator)) % n
    return i, j


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Jaccard |A∩B| / |A∪B| of index sets a [P, k], b [P, k] (each row's entries
    distinct, as top-k indices are) → [P] float64."""
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    return inter / (a.shape[-1] + b.shape[-1] - inter)


def occupancy_cv(indices: torch.Tensor, num_rows: int) -> float:
    """Q-occupancy: population std / mean of the usage counts of the rows that were used at
    least once among `indices` (any shape, values in [0, num_rows))."""
    counts = torch.bincount(indices.flatten(), minlength=num_rows)
    used = counts[counts > 0].double()
    return float(used.std(correction=0) / used.mean())


def spectrum(x: torch.Tensor) -> tuple[float, float]:
    """V-rank of a matrix x [m, n] → (hard rank, effective rank).

    hard rank = #{σ > max(m, n)·eps·σ_max} (eps of x's dtype; torch.linalg.matrix_rank's default);
    effective rank = exp(H(p)), p = σ²/Σσ², H the entropy in nats. A zero matrix → (0, nan)."""
    s = torch.linalg.svdvals(x)
    if float(s.max()) == 0.0:
        return 0.0, math.nan
    tol = max(x.shape) * torch.finfo(s.dtype).eps * s.max()
    p = s.double().square() / s.double().square().sum()
    return float((s > tol).sum()), math.exp(float(-torch.special.xlogy(p, p).sum()))


# ---------------------------------------------------------------------------------- probe


class InjectionBattery(Probe):
    name = "injection-battery"
    scope = "cell"
    description = ("Per injection layer: concentration (W), alignment with the hidden state (A), Gaussian content "
                   "swap (X), top-k overlap and row occupancy (Q), value rank (V) (§7.5).")

    class Params(Params):
        table_seed: int = 42  # X: seed of the Gaussian table (the reference's CLI default; ZEB-136 used 99)
        seed: int = 0  # Q-overlap token pairs and the X floor's permutation
        pairs: int = 500  # Q-overlap: random distinct token pairs per batch

    metrics = tuple(Metric(name, meaning, unit, "injection battery") for name, meaning, unit in (
        ("inj_concentration_R_L{l}", "W: R = norm of the mean unit injection vector over a batch's tokens (signed "
                                     "concentration, unitless, in [0, 1])", "unitless"),
        ("inj_axis_rms_L{l}", "W: axis RMS = √(mean over all token pairs of cos²(inj_i, inj_j)), via the d×d Gram "
                              "trick (unitless, in [R², 1]; 1 = every injection on one axis, either sign)", "unitless"),
        ("inj_hidden_cos_L{l}", "A: mean signed cos(injection, hidden state it is added to) (unitless, in [−1, 1])",
         "unitless"),
        ("inj_hidden_abs_cos_L{l}", "A |abs|: mean |cos(injection, hidden state it is added to)| (unitless, in "
                                    "[0, 1])", "unitless"),
        ("content_swap_cos_L{l}", "X: mean signed cos between the injection on the cell's own table and on a "
                                  "Gaussian table with its per-dimension mean/std (seed 42), same model and hidden "
                                  "states (unitless, in [−1, 1]; 1 = V content-blind)", "unitless"),
        ("content_swap_abs_cos_L{l}", "X |abs|: the same, mean |cos| (unitless, in [0, 1])", "unitless"),
        ("content_swap_floor_L{l}", "X floor: mean |cos| between each token's injection and another random token's "
                                    "(unitless, in [0, 1]; what X |abs| reads with unrelated content)", "unitless"),
        ("topk_jaccard_mean_L{l}", "Q-overlap: mean Jaccard of the top-k row sets of 500 random distinct token "
                                   "pairs (seed 0) (unitless, in [0, 1])", "unitless"),
        ("topk_jaccard_median_L{l}", "Q-overlap: median of those Jaccards (unitless, in [0, 1])", "unitless"),
        ("row_usage_cv_L{l}", "Q-occupancy: population std / mean of the retrieval counts of the rows used at least "
                              "once in a batch (unitless; 0 = even use)", "unitless"),
        ("v_rank_rows_eff_L{l}", "V-rank: effective rank exp(H(σ²/Σσ²)) of LayerNorm(T[S]), S = the batch's unique "
                                 "retrieved rows (dimensions, ≤ engram_dim)", "dimensions"),
        ("v_rank_values_eff_L{l}", "V-rank: effective rank of the value projection W_v·LayerNorm(T[S]) (dimensions)",
         "dimensions"),
        ("v_rank_rows_hard_L{l}", "V-rank: hard rank of LayerNorm(T[S]), tolerance max(m, n)·eps·σ_max (dimensions)",
         "dimensions"),
        ("v_rank_values_hard_L{l}", "V-rank: hard rank of W_v·LayerNorm(T[S]) (dimensions)", "dimensions"),
        ("v_rank_hard_ratio_L{l}", "V-rank: v/e = hard rank of the values / hard rank of the rows (unitless; < 1 = "
                                   "the value projection compresses)", "unitless"),
    ))

    def run(self, view: CellView) -> dict[str, float]:
        student = view.student
        gaussian = gaussian_twin(student.table, self.params.table_seed).to(student.table.device)
        per: dict[str, list[float]] = {}
        with measuring(view):
            for i in range(len(view.val_batches)):
                for l, tr in traced(view, i).layers.items():
                    for key, v in layer_battery(student, l, tr, gaussian, self.params).items():
                        per.setdefault(f"{key}_L{l}", []).append(v)
        return {key: mean(vs) for key, vs in per.items()}


def layer_battery(student: StudentView, l: int, tr: InjectionTrace, gaussian: torch.Tensor,
                  params) -> dict[str, float]:
    """W/A/X/Q/V of layer l's trace (h_in, inj [B, T, d]; indices [B, T, k]) on one batch.

    gaussian: [N, E] Gaussian twin of the student's table [N, E]."""
    table = student.table
    inj, h = tr.inj.flatten(0, -2), tr.h_in.flatten(0, -2)  # [B·T, d]
    indices = tr.indices.flatten(0, -2)  # [B·T, k]
    swapped = student.inject(l, tr.h_in, gaussian).inj  # [B, T, d], gate included
    r, axis = concentration(inj)
    a_signed, a_abs = cos_stats(inj, h)
    x_signed, x_abs = cos_stats(inj, swapped.flatten(0, -2))
    i, j = distinct_pairs(inj.shape[0], params.pairs, torch.Generator().manual_seed(params.seed))
    overlap = jaccard(indices[i.to(indices.device)], indices[j.to(indices.device)])
    rows, values = student.row_values(l, indices.unique())  # [m, E], [m, d]
    rows_hard, rows_eff = spectrum(rows)
    values_hard, values_eff = spectrum(values)
    return {
        "inj_concentration_R": r, "inj_axis_rms": axis,
        "inj_hidden_cos": a_signed, "inj_hidden_abs_cos": a_abs,
        "content_swap_cos": x_signed, "content_swap_abs_cos": x_abs,
        "content_swap_floor": swap_floor(inj, torch.Generator().manual_seed(params.seed)),
        "topk_jaccard_mean": float(overlap.mean()),
        "topk_jaccard_median": float(torch.quantile(overlap, 0.5)),
        "row_usage_cv": occupancy_cv(indices, table.shape[0]),
        "v_rank_rows_eff": rows_eff, "v_rank_values_eff": values_eff,
        "v_rank_rows_hard": rows_hard, "v_rank_values_hard": values_hard,
        "v_rank_hard_ratio": values_hard / rows_hard if rows_hard else math.nan,
    }


BATTERY_PROBES = (InjectionBattery,)
