import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ablate.api.components import LoadedTeacher
from ablate.errors import InputError
from ablate.oracle.build import (
    SIDECAR_FILE, SIDECAR_KEY, STATS_FILE, TABLE_FILE, Oracle, OracleConfig, RowAccumulator, assemble_oracle,
    build_oracle, fit_pca, gaussian_twin, load_oracle, save_oracle, shuffled,
)

# ------------------------------------------------------------------------------ accumulation


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n_rows=st.integers(1, 8), dim=st.integers(1, 4),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_row_accumulator_matches_dict_reference(data, n_rows, dim, dtype):
    n_adds = data.draw(st.integers(1, 4))
    sums, counts = defaultdict(lambda: np.zeros(dim)), defaultdict(int)
    acc = RowAccumulator(n_rows, dim, "cpu", dtype)
    for _ in range(n_adds):
        k = data.draw(st.integers(0, 12))
        rows = data.draw(st.lists(st.integers(-1, n_rows - 1), min_size=k, max_size=k))
        values = data.draw(st.lists(st.lists(st.floats(-100, 100), min_size=dim, max_size=dim), min_size=k, max_size=k))
        acc.add(torch.tensor(rows, dtype=torch.int64), torch.tensor(values, dtype=torch.float64).reshape(k, dim))
        for r, v in zip(rows, values):
            if r >= 0:
                sums[r] += np.array(v)
                counts[r] += 1
    mean, populated = acc.mean()
    assert mean.dtype == torch.float32 and mean.shape == (n_rows, dim)
    for r in range(n_rows):
        assert bool(populated[r]) == (counts[r] > 0)
        assert acc.row_counts()[r].item() == counts[r]
        if counts[r]:
            np.testing.assert_allclose(mean[r].numpy(), sums[r] / counts[r], rtol=1e-5, atol=1e-4)
        else:
            assert torch.all(mean[r] == 0)


# ---------------------------------------------------------------------------------------- PCA


def test_fit_pca_matches_numpy_svd_of_the_same_subset():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)
    pca = fit_pca(torch.from_numpy(x), 4, sample_min=50, sample_frac=0.5, seed=7)
    subset = x[np.random.default_rng(7).choice(300, size=150, replace=False)]
    centred = subset - subset.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    assert pca.explained_variance_ratio_total == pytest.approx((s[:4] ** 2).sum() / (s ** 2).sum(), rel=1e-10)
    np.testing.assert_allclose(pca.mean.numpy(), subset.mean(axis=0), rtol=1e-10, atol=1e-12)
    cos = np.abs(np.sum(pca.components.numpy() * vt[:4], axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-8)


@pytest.mark.parametrize("n, sample_min, frac, expected_size", [
    (100, 512, 0.2, 100),   # fewer rows than the minimum: all of them
    (5000, 512, 0.2, 1000),  # fraction wins
    (1000, 512, 0.2, 512),  # minimum wins
    (10, 3, 0.95, 9),       # floor of the fraction
])
def test_fit_pca_subset_size_rule(n, sample_min, frac, expected_size):
    x = np.random.default_rng(0).normal(size=(n, 3))
    pca = fit_pca(torch.from_numpy(x), 2, sample_min, frac, seed=11)
    subset = x[np.random.default_rng(11).choice(n, size=expected_size, replace=False)]
    np.testing.assert_allclose(pca.mean.numpy(), subset.mean(axis=0), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4))
def test_data_in_a_k_dim_affine_subspace_is_fully_explained(seed, k):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(8, k)))[0].T  # [k, 8] orthonormal
    offset = rng.normal(size=8)
    x = rng.normal(size=(60, k)) @ basis + offset
    pca = fit_pca(torch.from_numpy(x), k, sample_min=60, sample_frac=0.2, seed=seed)
    assert pca.explained_variance_ratio_total == pytest.approx(1.0, abs=1e-10)
    reconstructed = pca.project(torch.from_numpy(x)) @ pca.components + pca.mean
    np.testing.assert_allclose(reconstructed.numpy(), x, atol=1e-9)


def test_fit_pca_rejects_too_few_rows_or_dims():
    with pytest.raises(InputError, match="engram_dim=5"):
        fit_pca(torch.randn(4, 16), 5, sample_min=512, sample_frac=0.2, seed=0)
    with pytest.raises(InputError, match="dimension 3"):
        fit_pca(torch.randn(100, 3), 5, sample_min=512, sample_frac=0.2, seed=0)


# ------------------------------------------------------------------------------- oracle pass


class TinyTeacher(LoadedTeacher):
    """hidden[p] = mean of embeddings of tokens 0..p (causal); logits = tanh(hidden) @ W + c."""

    def __init__(self, vocab=40, hidden=12):
        g = torch.Generator().manual_seed(5)
        self.vocab_size, self.hidden_size = vocab, hidden
        self.emb = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
        self.w = torch.randn(hidden, vocab, generator=g, dtype=torch.float64)
        self.c = torch.randn(vocab, generator=g, dtype=torch.float64)
        self.info = {"source": "tiny-test", "layer": -2}

    def forward(self, tokens):
        e = self.emb.float()[tokens]
        hidden = e.cumsum(dim=1) / torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1)
        return hidden, torch.tanh(hidden) @ self.w.float() + self.c.float()

    def reference(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same function in float64 numpy, one sequence at a time."""
        e = self.emb.numpy()[seq]
        hidden = np.cumsum(e, axis=0) / np.arange(1, len(seq) + 1)[:, None]
        return hidden, np.tanh(hidden) @ self.w.numpy() + self.c.numpy()


def reference_means(teacher, sequences, cfg):
    """Per-row float64 means of hidden and logits with rows from the xxhash package."""
    h_sum, z_sum, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for seq in sequences:
        hidden, logits = teacher.reference(seq)
        for p in range(len(seq)):
            for order in cfg.orders:
                if p < order - 1:
                    continue
                data = np.array(seq[p - order + 1:p + 1], dtype="<u4").tobytes()
                for seed in cfg.seeds:
                    r = xxhash.xxh64_intdigest(data, seed) % cfg.rows
                    h_sum[r] = h_sum[r] + hidden[p]
                    z_sum[r] = z_sum[r] + logits[p]
                    count[r] += 1
    return h_sum, z_sum, count


@pytest.mark.parametrize("rows, max_tokens", [(61, None), (1500, None), (61, 70)])
def test_build_oracle_end_to_end_against_float64_reference(rows, max_tokens):
    teacher = TinyTeacher()
    stream = torch.randint(0, teacher.vocab_size, (5 * 32 + 7,), generator=torch.Generator().manual_seed(9))
    cfg = OracleConfig(rows=rows, engram_dim=4, batch=2, seq_len=32, pca_sample_min=20, chunk=24,
                       cos_sample=30, max_tokens=max_tokens)
    seen = []
    oracle = build_oracle(teacher, stream, cfg, "cpu", progress=seen.append)

    s = stream.numpy()
    if max_tokens is None:
        sequences, n_tokens = [s[i * 32:(i + 1) * 32] for i in range(5)], 160
    else:
        sequences, n_tokens = [s[0:32], s[32:64], s[64:70]], 70
    assert sum(seen) == n_tokens == oracle.stats["tokens"]

    h_sum, z_sum, count = reference_means(teacher, sequences, cfg)
    populated = np.array([count[r] > 0 for r in range(rows)])
    np.testing.assert_array_equal(oracle.populated.numpy(), populated)
    np.testing.assert_array_equal(oracle.counts.numpy(), [count[r] for r in range(rows)])
    assert oracle.stats["total_entries"] == sum(count.values())
    assert oracle.stats["populated_rows"] == populated.sum()

    # sidecar: mean raw logits per row; unpopulated rows exactly 0
    z_mean = np.stack([z_sum[r] / count[r] if count[r] else np.zeros(teacher.vocab_size) for r in range(rows)])
    np.testing.assert_allclose(oracle.sidecar.numpy(), z_mean, rtol=1e-5, atol=1e-5)
    assert torch.all(oracle.sidecar[~oracle.populated] == 0)
    assert torch.all(oracle.table[~oracle.populated] == 0)
    if rows == 1500:
        assert (~oracle.populated).any()

    # table: PCA (fit on the reference subset rule) of the float64 hidden means
    pop_idx = np.flatnonzero(populated)
    h_mean = np.stack([h_sum[r] / count[r] for r in pop_idx])
    size = min(len(pop_idx), max(20, min(len(pop_idx), math.floor(0.2 * len(pop_idx)))))
    subset = h_mean[np.random.default_rng(42).choice(len(pop_idx), size=size, replace=False)]
    _, sv, vt = np.linalg.svd(subset - subset.mean(axis=0), full_matrices=False)
    expected = (h_mean - subset.mean(axis=0)) @ vt[:4].T
    got = oracle.table.numpy()[pop_idx]
    signs = np.sign(np.sum(got * expected, axis=0))
    np.testing.assert_allclose(got, expected * signs, rtol=1e-4, atol=1e-5)
    assert oracle.stats["pca_explained_variance_ratio_total"] == pytest.approx(
        (sv[:4] ** 2).sum() / (sv ** 2).sum(), rel=1e-5)

    # |cos| statistics over the sampled populated rows, in float64
    pick = torch.from_numpy(pop_idx)[torch.randperm(len(pop_idx), generator=torch.Generator().manual_seed(0))[:30]]
    x = expected[np.searchsorted(pop_idx, pick.numpy())] * signs
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.abs(x @ x.T)[np.triu_indices(len(x), 1)]
    stats = oracle.stats["pairwise_abs_cos"]
    assert stats["median"] == pytest.approx(np.median(cos), abs=1e-5)
    assert stats["mean"] == pytest.approx(cos.mean(), abs=1e-5)
    assert stats["p90"] == pytest.approx(np.percentile(cos, 90), abs=1e-5)
    obs = [count[r] for r in pop_idx]
    assert oracle.stats["observations_per_row"] == {"mean": pytest.approx(np.mean(obs)), "min": min(obs), "max": max(obs)}
    assert oracle.stats["teacher"] == teacher.info and oracle.stats["layer"] == -2
    json.dumps(oracle.stats, allow_nan=False)


def test_seq_len_longer_than_corpus_is_an_input_error():
    with pytest.raises(InputError, match="longer than the corpus"):
        build_oracle(TinyTeacher(), torch.arange(20) % 40, OracleConfig(seq_len=32), "cpu")


def test_teacher_with_wrong_output_shape_is_an_input_error():
    teacher = TinyTeacher()
    teacher.hidden_size = 13
    with pytest.raises(InputError, match="hidden_size"):
        build_oracle(teacher, torch.arange(64) % 40, OracleConfig(rows=10, engram_dim=2, seq_len=32), "cpu")


def test_mismatched_populated_masks_are_an_input_error():
    hidden, sidecar = RowAccumulator(5, 3, "cpu"), RowAccumulator(5, 4, "cpu", torch.float32)
    hidden.add(torch.tensor([0, 1, 2]), torch.randn(3, 3))
    sidecar.add(torch.tensor([0, 1, 3]), torch.randn(3, 4))
    with pytest.raises(InputError, match="sidecar"):
        assemble_oracle(hidden, sidecar, OracleConfig(rows=5, engram_dim=2), {})


# ---------------------------------------------------------------------------------- controls


def labelled_oracle(rows=50, dim=3, vocab=7):
    """Row i of every tensor carries the label i, so a row's origin can be read back."""
    label = torch.arange(rows, dtype=torch.float32)
    counts = torch.arange(rows, dtype=torch.int64) % 4
    populated = counts > 0
    table = (label.unsqueeze(1) * torch.ones(dim)) * populated.unsqueeze(1)
    sidecar = (label.unsqueeze(1) + 1000 * torch.ones(vocab)) * populated.unsqueeze(1)
    return Oracle(table=table, sidecar=sidecar, populated=populated, counts=counts, stats={"rows": rows})


def test_shuffled_applies_one_permutation_to_all_tensors():
    oracle = labelled_oracle()
    twin = shuffled(oracle, seed=0)
    assert twin.stats["shuffle_seed"] == 0 and twin.stats["rows"] == 50
    moved = 0  # each populated shuffled row's source is read back from its sidecar label
    for i in range(50):
        if twin.populated[i]:
            j = int(twin.sidecar[i, 0].item()) - 1000
            assert torch.all(twin.table[i] == j)
            assert torch.all(twin.sidecar[i] == oracle.sidecar[j])
            assert twin.counts[i] == oracle.counts[j]
            moved += j != i
        else:
            assert torch.all(twin.table[i] == 0) and torch.all(twin.sidecar[i] == 0) and twin.counts[i] == 0
    assert moved > 0
    assert sorted(twin.counts.tolist()) == sorted(oracle.counts.tolist())
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(twin.counts, oracle.counts[perm])


def test_gaussian_twin_matches_per_dimension_moments():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(20000, 3, generator=g) * torch.tensor([0.5, 2.0, 7.0]) + torch.tensor([1.0, -3.0, 0.0])
    twin = gaussian_twin(table, seed=42)
    assert twin.shape == table.shape and twin.dtype == torch.float32
    np.testing.assert_allclose(twin.double().mean(0).numpy(), table.double().mean(0).numpy(), atol=0.12)
    np.testing.assert_allclose(twin.double().std(0).numpy() / table.double().std(0).numpy(), 1.0, atol=0.03)
    assert torch.equal(twin, gaussian_twin(table, seed=42))
    assert not torch.equal(twin, gaussian_twin(table, seed=99))
    # content is destroyed: rows are not correlated with the originals
    corr = np.corrcoef(twin[:, 2].numpy(), table[:, 2].numpy())[0, 1]
    assert abs(corr) < 0.05


# ---------------------------------------------------------------------------------- artifacts


def test_save_load_round_trip(tmp_path):
    oracle = labelled_oracle()
    oracle.stats = {"rows": 50, "pairwise_abs_cos": {"median": None}, "hash_seeds": [42, 2**64 - 1]}
    save_oracle(oracle, tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted([TABLE_FILE, SIDECAR_FILE, STATS_FILE])
    back = load_oracle(tmp_path / "o")
    for name in ("table", "sidecar", "populated", "counts"):
        assert torch.equal(getattr(back, name), getattr(oracle, name)), name
    assert back.stats == oracle.stats


def test_truncated_file_is_a_corrupt_artifact(tmp_path):
    save_oracle(labelled_oracle(), tmp_path)
    path = tmp_path / TABLE_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="corrupt artifact .*recomputed"):
        load_oracle(tmp_path)


def test_missing_file_is_named(tmp_path):
    save_oracle(labelled_oracle(), tmp_path)
    (tmp_path / SIDECAR_FILE).unlink()
    with pytest.raises(InputError, match=SIDECAR_FILE):
        load_oracle(tmp_path)


def test_sidecar_row_count_must_match_table(tmp_path):
    save_oracle(labelled_oracle(rows=50), tmp_path)
    save_file({SIDECAR_KEY: torch.zeros(49, 7)}, str(tmp_path / SIDECAR_FILE))
    with pytest.raises(InputError, match="49 rows but the table has 50"):
        load_oracle(tmp_path)
