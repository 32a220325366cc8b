import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.errors import InputError
from ablate.oracle.hashing import canonical_rows, ngram_hashes, row_ids, unsigned_mod

N = 10_000
U64 = 1 << 64


def reference_hash(ids: list[int], seed: int) -> int:
    return xxhash.xxh64_intdigest(np.array(ids, dtype="<u4").tobytes(), seed)


def hash_of(ids: list[int], seed: int) -> int:
    """The torch hash of the n-gram ending at the last position, as an unsigned Python int."""
    h = ngram_hashes(torch.tensor([ids], dtype=torch.int64), len(ids), seed)[0, -1].item()
    return h % U64


@pytest.mark.parametrize(
    "ids, seed, expected_hash, expected_row",
    [
        ([1, 2], 42, 3277852430839610312, 312),
        ([1, 2, 3], 42, 11547749587308120431, 431),
        ([1, 2, 3], 99, None, 5552),
        ([1, 2, 3], 137, None, 5849),
        ([1, 2, 3], 251, None, 1663),
        ([100, 200, 300], 42, None, 2889),
        ([0, 0, 0], 42, None, 6089),
    ],
)
def test_reference_vectors(ids, seed, expected_hash, expected_row):
    tokens = torch.tensor([ids], dtype=torch.int64)
    if expected_hash is not None:
        assert hash_of(ids, seed) == expected_hash
    rows = row_ids(tokens, N, seeds=(seed,), orders=(len(ids),))
    assert rows[0, -1, 0].item() == expected_row


def test_xxhash_package_agrees_with_reference_sanity_vector():
    # guards the independent reference itself (reference §2.1 sanity value)
    assert xxhash.xxh64_intdigest(b"abc", 0) == 0x44BC2CF5AD770999


ids_u32 = st.integers(min_value=0, max_value=2**32 - 1)
seeds_u64 = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=50, deadline=None)
@given(order=st.sampled_from([2, 3]), ids=st.lists(ids_u32, min_size=3, max_size=3),
       seed=seeds_u64, n_rows=st.integers(min_value=1, max_value=2**31))
def test_hash_and_unsigned_mod_match_xxhash(order, ids, seed, n_rows):
    ids = ids[:order]
    expected = reference_hash(ids, seed)
    h = ngram_hashes(torch.tensor([ids], dtype=torch.int64), order, seed)[:, -1]
    assert h.item() % U64 == expected
    assert unsigned_mod(h, n_rows).item() == expected % n_rows


@settings(max_examples=25, deadline=None)
@given(tokens=st.lists(st.lists(ids_u32, min_size=6, max_size=6), min_size=1, max_size=3),
       seeds=st.lists(seeds_u64, min_size=1, max_size=3), n_rows=st.integers(1, 50_000))
def test_row_ids_every_position_and_column(tokens, seeds, n_rows):
    t = torch.tensor(tokens, dtype=torch.int64)
    out = row_ids(t, n_rows, seeds=seeds, orders=(2, 3))
    assert out.shape == (t.shape[0], t.shape[1], 2 * len(seeds))
    for b, seq in enumerate(tokens):
        for p in range(len(seq)):
            for oi, order in enumerate((2, 3)):
                for si, seed in enumerate(seeds):
                    col = oi * len(seeds) + si
                    if p < order - 1:
                        expected = -1
                    else:
                        expected = reference_hash(seq[p - order + 1:p + 1], seed) % n_rows
                    assert out[b, p, col].item() == expected


def test_ngram_hashes_zero_before_first_full_ngram():
    t = torch.tensor([[5, 6, 7, 8]], dtype=torch.int64)
    assert ngram_hashes(t, 3, 42)[0, :2].tolist() == [0, 0]
    assert ngram_hashes(t, 2, 42)[0, 0].item() == 0
    # shorter than the n-gram: nothing defined, no error
    assert ngram_hashes(t[:, :2], 3, 42).tolist() == [[0, 0]]


def test_canonical_rows_is_first_seed_trigram():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 32000, size=20).tolist()
    rows = canonical_rows(torch.tensor([seq]), N)[0].tolist()
    assert rows[:2] == [-1, -1]
    assert rows[2:] == [reference_hash(seq[p - 2:p + 1], 42) % N for p in range(2, 20)]


def test_unsigned_mod_rejects_bad_row_counts():
    with pytest.raises(InputError):
        unsigned_mod(torch.tensor([1]), 0)
    with pytest.raises(InputError):
        unsigned_mod(torch.tensor([1]), 2**31 + 1)


def test_invalid_order_rejected():
    with pytest.raises(ValueError):
        ngram_hashes(torch.tensor([[1, 2, 3, 4]]), 4, 42)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    t = torch.randint(0, 2**32, (4, 257), generator=torch.Generator().manual_seed(1))
    cpu = row_ids(t, N, seeds=(42, 2**64 - 1))
    gpu = row_ids(t.cuda(), N, seeds=(42, 2**64 - 1)).cpu()
    assert torch.equal(cpu, gpu)
