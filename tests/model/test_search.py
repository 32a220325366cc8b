"""top_indices (the grouped candidate search) selects what scores.topk selects."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.model.search import top_indices

torch.set_num_threads(1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 2500), st.integers(1, 24),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_distinct_scores_give_topk_indices_in_descending_order(seed, rows, n, count, dtype):
    """Scores are a random permutation of distinct values (exact in bf16 too): the very indices of
    topk, and the scores they pick descend."""
    count = min(count, n)
    g = torch.Generator().manual_seed(seed)
    # n consecutive positive bfloat16 numbers (increasing bit patterns): distinct in either dtype
    values = (torch.arange(0x3000, 0x3000 + n, dtype=torch.int16).view(torch.bfloat16)).to(dtype)
    scores = torch.stack([values[torch.randperm(n, generator=g)] for _ in range(rows)]).reshape(rows, 1, n)
    got = top_indices(scores, count)
    assert got.shape == (rows, 1, count) and got.dtype == torch.int64
    assert torch.equal(got, scores.topk(count, dim=-1).indices)
    picked = scores.gather(-1, got).float()
    assert (picked[..., :-1] > picked[..., 1:]).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 2500), st.integers(1, 24), st.integers(1, 6))
def test_with_ties_the_picked_scores_equal_topks(seed, n, count, levels):
    """Few distinct values (many ties): the selected scores, as a multiset, are topk's; no index
    repeats."""
    count = min(count, n)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (4, n), generator=g).float()
    got = top_indices(scores, count)
    torch.testing.assert_close(scores.gather(-1, got), scores.topk(count, dim=-1).values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == count for row in got)


def test_the_tail_beyond_whole_groups_is_searched():
    """n = 10,007 (groups of 100 cover 10,000 columns): winners among the last 7 are found."""
    scores = torch.zeros(2, 10_007)
    scores[0, 10_003] = 5.0
    scores[1, -1] = 3.0
    scores[1, 17] = 4.0
    assert top_indices(scores, 2)[0, 0].item() == 10_003
    assert top_indices(scores, 2)[1].tolist() == [17, 10_006]
