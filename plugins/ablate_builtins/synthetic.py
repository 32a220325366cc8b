"""The embedded synthetic corpus: a seeded token stream with planted, learnable structure.

Generator (all randomness from `numpy.random.default_rng(seed)`; same parameters → same stream):

- Vocabulary: ids 0..V−1, id 0 = EOS. Content tokens are 1..V−1.
- Documents: each document is L content tokens followed by one EOS, with
  L ~ Geometric(q) on {1, 2, …}, q = 1/doc_len (mean doc_len). Because the geometric law is
  memoryless, after a content token the next token is EOS with probability q; after an EOS
  it is never EOS. The stream is the concatenation of documents, cut at n_tokens.
- Background: π(k) ∝ k^(−zipf_a) over content tokens k = 1..V−1 (token 1 most frequent);
  zipf_a = 0 is the uniform background.
- Rules: the context of position t is the bigram (a, b) = (x[t−2], x[t−1]) of the previous two
  stream tokens, EOS included (the stream is preceded by (0, 0)). A 64-bit hash marks (a, b)
  as a *rule context* with probability `planted_fraction` and gives it a target f(a, b),
  uniform over 1..V−1: with s(x) the splitmix64 finaliser (x += 0x9E3779B97F4A7C15;
  x = (x ^ x>>30)·0xBF58476D1CE4E5B9; x = (x ^ x>>27)·0x94D049BB133111EB; x ^ x>>31, mod 2⁶⁴),
  h₁ = s((a·V + b) XOR s(seed)), rule ⇔ ⌊h₁ / 2¹¹⌋·2⁻⁵³ < planted_fraction,
  f = 1 + s(h₁) mod (V − 1). At a content position with a rule context the next
  token is f(a, b) with probability `determinism`, otherwise a background draw; at a content
  position with a non-rule context it is a background draw. So
      P(k | rule ctx) = d·[k = f] + (1 − d)·π(k),   P(k | other ctx) = π(k)        (d = determinism)
- structure = "none": no rule contexts (planted_fraction is ignored): i.i.d. background
  tokens between EOS marks; nothing to learn beyond the unigram distribution.

Entropy (nats per token). Seen from any history, the next token depends only on the context
(a, b), so the generator is a Markov chain over bigram states and its entropy rate is
    H = Σ_(a,b) μ(a,b)·H(a,b),   H(a,b) = H_c(a,b) if b = EOS else h(q) + (1 − q)·H_c(a,b),
with μ the stationary distribution, h the binary entropy and H_c the entropy of the content
distribution above. `entropy_rate` computes μ exactly by power iteration (O(V²) per step, using
the rank-one-plus-sparse transition structure). It depends on the realised hash: with a Zipf
background a few frequent contexts dominate, so the share of positions that sit in rule
contexts is not planted_fraction. `realised_entropy` gives the mean of H(a,b) over the actual
positions of a stream: the expected cross-entropy of a perfect model on that stream.

Random draws, in this order: document lengths (`rng.geometric(q, size=⌊1.2·n·q⌋ + 16)`, extended
by further blocks of the same size until they cover n tokens), n uniforms mapped through the
cumulative π (`searchsorted(cdf, u, side="right")`) for the background draws, n uniforms u′ with
"follow the rule" ⇔ u′ < determinism.

Fast generation: background draws, uniforms and document boundaries are drawn in vectorised
calls; the sequential rule dependency is solved by fixed-point iteration that only revisits
positions whose two predecessors changed (the fixed point is unique, so it is the stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

EOS = 0
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SyntheticSpec:
    vocab_size: int = 512
    n_tokens: int = 400_000
    seed: int = 0
    doc_len: float = 200.0
    zipf_a: float = 1.1
    planted_fraction: float = 0.5
    determinism: float = 0.9
    structure: Literal["planted", "none"] = "planted"

    @property
    def rule_fraction(self) -> float:
        return self.planted_fraction if self.structure == "planted" else 0.0


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def background_distribution(vocab_size: int, zipf_a: float) -> np.ndarray:
    """π over all ids [V] float64: π[0] = 0 (EOS), π[k] ∝ k^−a for k ≥ 1."""
    p = np.zeros(vocab_size, dtype=np.float64)
    p[1:] = np.arange(1, vocab_size, dtype=np.float64) ** -zipf_a
    return p / p.sum()


def rule_lookup(spec: SyntheticSpec, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contexts (a, b) [n] → (is_rule [n] bool, target [n] int64 in 1..V−1)."""
    key = a.astype(np.uint64) * np.uint64(spec.vocab_size) + b.astype(np.uint64)
    salt = _splitmix64(np.array([spec.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h1 = _splitmix64(key ^ salt)
    h2 = _splitmix64(h1)
    unit = (h1 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    is_rule = unit < spec.rule_fraction
    target = (h2 % np.uint64(spec.vocab_size - 1)).astype(np.int64) + 1
    return is_rule, target


def generate(spec: SyntheticSpec) -> np.ndarray:
    """The token stream [n_tokens] int64 described in the module docstring."""
    n, V = spec.n_tokens, spec.vocab_size
    rng = np.random.default_rng(spec.seed)
    q = 1.0 / spec.doc_len

    # Document boundaries: EOS after each geometric-length document.
    block = int(n * q * 1.2) + 16
    lengths = rng.geometric(q, size=block)
    while lengths.sum() + lengths.size < n:
        lengths = np.concatenate([lengths, rng.geometric(q, size=block)])
    eos_pos = np.cumsum(lengths + 1) - 1
    is_eos = np.zeros(n, dtype=bool)
    is_eos[eos_pos[eos_pos < n]] = True

    cdf = np.cumsum(background_distribution(V, spec.zipf_a))
    background = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), V - 1).astype(np.int64)
    follows_rule = rng.random(n) < spec.determinism  # used only at rule contexts

    x = np.where(is_eos, EOS, background)
    if spec.rule_fraction == 0.0:
        return x
    padded = np.concatenate([[EOS, EOS], x])  # padded[t + 2] = x[t]
    candidates = follows_rule & ~is_eos
    active = np.flatnonzero(candidates)
    while active.size:
        is_rule, target = rule_lookup(spec, padded[active], padded[active + 1])
        new = np.where(is_rule, target, background[active])
        differs = new != padded[active + 2]
        changed = active[differs]
        padded[changed + 2] = new[differs]
        nxt = np.sort(np.concatenate([changed + 1, changed + 2]))
        nxt = nxt[(nxt < n) & np.append(True, nxt[1:] != nxt[:-1])]
        active = nxt[candidates[nxt]]
    return padded[2:].copy()


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def rule_entropies(spec: SyntheticSpec) -> np.ndarray:
    """[V] float64: entropy (nats) of d·[k = c] + (1 − d)·π for target c (entry 0 unused = 0)."""
    pi = background_distribution(spec.vocab_size, spec.zipf_a)
    d = spec.determinism
    rest = (1 - d) * pi
    with np.errstate(divide="ignore", invalid="ignore"):
        rest_terms = np.where(rest > 0, -rest * np.log(rest), 0.0)
    total_rest = rest_terms.sum()
    peak = d + rest
    out = total_rest - rest_terms - peak * np.log(peak)
    out[0] = 0.0
    return out


def _rule_tables(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """(is_rule [V, V] bool, target [V, V] int64) for every context (a, b)."""
    V = spec.vocab_size
    a, b = np.divmod(np.arange(V * V, dtype=np.int64), V)
    is_rule, target = rule_lookup(spec, a, b)
    return is_rule.reshape(V, V), target.reshape(V, V)


def _state_entropies(spec: SyntheticSpec, is_rule: np.ndarray, target: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H(a, b) (nats) for contexts given by is_rule / target / b arrays of one shape."""
    pi = background_distribution(spec.vocab_size, spec.zipf_a)
    h_content = np.where(is_rule, rule_entropies(spec)[target], _entropy(pi))
    q = 1.0 / spec.doc_len
    h_q = _entropy(np.array([q, 1 - q]))
    return np.where(b == EOS, h_content, h_q + (1 - q) * h_content)


MAX_EXACT_VOCAB = 1024  # V² states per power-iteration step: about a second at this size


def entropy_rate(spec: SyntheticSpec, tol: float = 1e-10, max_iter: int = 20_000) -> float | None:
    """Exact entropy rate (nats/token) of the generator, or None when V > MAX_EXACT_VOCAB."""
    V = spec.vocab_size
    if V > MAX_EXACT_VOCAB:
        return None
    q, d = 1.0 / spec.doc_len, spec.determinism
    pi = background_distribution(V, spec.zipf_a)
    is_rule, target = _rule_tables(spec)
    b = np.broadcast_to(np.arange(V), (V, V))
    rule_cell = (b * V + target).ravel()  # where the rule mass of (a, b) lands: state (b, f(a, b))
    mass = np.full((V, V), 1.0 / V**2)  # μ[a, b]
    for _ in range(max_iter):
        into_b = mass.sum(axis=0)
        rule_mass = mass * is_rule * d
        content = np.outer(into_b - rule_mass.sum(axis=0), pi)
        content += np.bincount(rule_cell, weights=rule_mass.ravel(), minlength=V * V).reshape(V, V)
        new = (1 - q) * content
        new[:, EOS] = q * into_b
        new[EOS] = content[EOS]  # after an EOS the next token is always content
        converged = np.abs(new - mass).sum() < tol
        mass = new
        if converged:
            break
    return float((mass * _state_entropies(spec, is_rule, target, b)).sum())


def realised_entropy(spec: SyntheticSpec, stream: np.ndarray, start: int = 0) -> float:
    """Mean true conditional entropy (nats) over positions stream[start:] of a stream [M] int64
    produced by `generate(spec)` (earlier tokens supply the context of the first positions)."""
    padded = np.concatenate([[EOS, EOS], stream])
    t = np.arange(start, stream.size)
    a, b = padded[t], padded[t + 1]
    is_rule, target = rule_lookup(spec, a, b)
    return float(_state_entropies(spec, is_rule, target, b).mean())


def describe(spec: SyntheticSpec) -> str:
    """One line for reports."""
    if spec.structure == "none":
        rules = "no planted rules (i.i.d. background tokens)"
    else:
        rules = (f"{spec.planted_fraction:.0%} of bigram contexts are rule contexts whose next token "
                 f"is a fixed target with probability {spec.determinism}")
    return (f"synthetic stream, V={spec.vocab_size} (id 0 = EOS), documents of geometric length "
            f"(mean {spec.doc_len:g}), Zipf(a={spec.zipf_a}) background; {rules}; seed {spec.seed}")
