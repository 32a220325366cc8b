"""Which real/control pair lends its metrics to the real cell, and the unigram-entropy bound name."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from ablate.verdicts.results import attribute_pairs, unigram_entropy


def _pair(real: str, control: str) -> dict:
    return {"real": real, "shuffled": control, "metrics": {"cross_run_cos": float(len(control))}}


def test_first_control_is_attributed_without_a_discriminator():
    pairs = [_pair("a", "a_shuf"), _pair("a", "a_gauss"), _pair("b", "b_shuf")]
    out = attribute_pairs(pairs, [])
    assert [p["attributed"] for p in out] == [True, False, True]
    assert all("attributed" not in p for p in pairs)  # the input is not modified


def test_the_discriminator_names_the_attributed_control():
    pairs = [_pair("a", "a_shuf"), _pair("a", "a_gauss")]
    assert [p["attributed"] for p in attribute_pairs(pairs, [("a", "a_gauss")])] == [False, True]
    # a discriminator pair that is not a real/control pair changes nothing
    assert [p["attributed"] for p in attribute_pairs(pairs, [("a", "b_shuf")])] == [True, False]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["s", "g", "h"])), unique=True, max_size=9),
       st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["s", "g", "h"])), max_size=4))
def test_exactly_one_pair_per_real_cell_is_attributed(raw_pairs, discriminated):
    out = attribute_pairs([_pair(r, c) for r, c in raw_pairs], discriminated)
    for real in {r for r, _ in raw_pairs}:
        assert sum(p["attributed"] for p in out if p["real"] == real) == 1


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40).filter(any))
def test_unigram_entropy_matches_a_float64_sum(counts):
    total = sum(counts)
    expected = -sum(c / total * math.log(c / total) for c in counts if c)
    assert math.isclose(unigram_entropy(torch.tensor(counts, dtype=torch.float64)), expected, rel_tol=1e-12, abs_tol=1e-12)
