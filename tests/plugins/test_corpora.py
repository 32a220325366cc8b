"""Built-in corpora: the synthetic generator against an independent sequential reference and
its documented statistics, text / token / HF-dataset loading and their user errors."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from ablate_builtins import synthetic
from ablate.errors import InputError
from ablate.api.plugins import load_registry
from ablate_builtins.corpora import (HFDatasetCorpus, SyntheticCorpus, TextFilesCorpus, TokenFilesCorpus,
                                     split_tail)

M64 = (1 << 64) - 1


# ------------------------------------------------------- independent reference generator


def splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_rule(spec, a: int, b: int) -> tuple[bool, int]:
    """Pure-Python integer version of the documented hash."""
    h1 = splitmix(((a * spec.vocab_size + b) ^ splitmix(spec.seed)) & M64)
    rule = (h1 >> 11) * 2.0**-53 < spec.rule_fraction
    return rule, 1 + splitmix(h1) % (spec.vocab_size - 1)


def zipf(spec) -> np.ndarray:
    p = np.array([0.0] + [k ** -spec.zipf_a for k in range(1, spec.vocab_size)])
    return p / p.sum()


def ref_generate(spec) -> list[int]:
    """The documented generator, one token at a time with the documented draws."""
    n, q = spec.n_tokens, 1.0 / spec.doc_len
    rng = np.random.default_rng(spec.seed)
    block = int(n * q * 1.2) + 16
    lengths = list(rng.geometric(q, size=block))
    while sum(lengths) + len(lengths) < n:
        lengths += list(rng.geometric(q, size=block))
    eos_at = set(np.cumsum(np.array(lengths) + 1) - 1)
    background = np.searchsorted(np.cumsum(zipf(spec)), rng.random(n), side="right")
    follow = rng.random(n) < spec.determinism
    out = [0, 0]
    for t in range(n):
        if t in eos_at:
            out.append(0)
            continue
        rule, target = ref_rule(spec, out[-2], out[-1])
        out.append(target if rule and follow[t] else min(int(background[t]), spec.vocab_size - 1))
    return out[2:]


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(3, 40), seed=st.integers(0, 2**32), doc_len=st.floats(1.0, 30.0),
       planted=st.floats(0.0, 1.0), det=st.floats(0.0, 1.0), structure=st.sampled_from(["planted", "none"]))
def test_generator_matches_sequential_reference(vocab, seed, doc_len, planted, det, structure):
    spec = synthetic.SyntheticSpec(vocab_size=vocab, n_tokens=1500, seed=seed, doc_len=doc_len,
                                   planted_fraction=planted, determinism=det, structure=structure)
    assert synthetic.generate(spec).tolist() == ref_generate(spec)


def test_generation_is_deterministic_per_seed():
    a = synthetic.generate(synthetic.SyntheticSpec(n_tokens=20_000, seed=7))
    b = synthetic.generate(synthetic.SyntheticSpec(n_tokens=20_000, seed=7))
    c = synthetic.generate(synthetic.SyntheticSpec(n_tokens=20_000, seed=8))
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.5


# --------------------------------------------------------------------- documented statistics


def contexts(spec, stream, start=0):
    """(is_rule, target) of positions start.. of the stream, through the pure-Python hash."""
    padded = [0, 0] + stream.tolist()
    pairs = [ref_rule(spec, padded[t], padded[t + 1]) for t in range(start, stream.size)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.fixture(scope="module")
def planted():
    spec = synthetic.SyntheticSpec(n_tokens=200_000, seed=3)
    return spec, synthetic.generate(spec)


def test_rule_contexts_follow_their_target_with_probability_determinism(planted):
    spec, x = planted
    rule_spec = synthetic.SyntheticSpec(n_tokens=spec.n_tokens, seed=spec.seed, structure="planted")
    is_rule, target = contexts(rule_spec, x)
    content = x != 0
    pi = zipf(spec)
    hits = (x == target)[content & is_rule]
    expected = (spec.determinism + (1 - spec.determinism) * pi[target])[content & is_rule]
    assert hits.size > 20_000
    assert abs(hits.mean() - expected.mean()) < 5 * math.sqrt(0.25 / hits.size)
    other = (x == target)[content & ~is_rule]  # a non-rule context's would-be target is just background
    assert abs(other.mean() - pi[target][content & ~is_rule].mean()) < 5 * math.sqrt(0.25 / other.size)


def test_none_structure_is_iid_background():
    spec = synthetic.SyntheticSpec(n_tokens=200_000, seed=3, structure="none")
    x = synthetic.generate(spec)
    planted_twin = synthetic.SyntheticSpec(n_tokens=spec.n_tokens, seed=spec.seed)
    is_rule, target = contexts(planted_twin, x)
    content = x != 0
    pi = zipf(spec)
    hits = (x == target)[content & is_rule]
    assert abs(hits.mean() - pi[target][content & is_rule].mean()) < 5 * math.sqrt(0.25 / hits.size)
    freq = np.bincount(x[content], minlength=spec.vocab_size) / content.sum()
    assert np.abs(freq - pi).max() < 5 * math.sqrt(pi.max() / content.sum())


def test_documents_have_geometric_lengths(planted):
    spec, x = planted
    eos = np.flatnonzero(x == 0)
    lengths = np.diff(np.concatenate([[-1], eos])) - 1
    assert lengths.min() >= 1  # never two EOS in a row, never an empty document
    assert abs(lengths.mean() - spec.doc_len) < 5 * spec.doc_len / math.sqrt(lengths.size)


def explicit_entropies(spec, stream, start=0) -> np.ndarray:
    """Entropy of the full next-token distribution [V] at positions start.., float64."""
    q, d = 1.0 / spec.doc_len, spec.determinism
    pi = zipf(spec)
    is_rule, target = contexts(spec, stream, start)
    prev = np.concatenate([[0], stream[:-1]])[start:]
    out = []
    for t in range(stream.size - start):
        p = pi.copy()
        if is_rule[t]:
            p = (1 - d) * pi
            p[target[t]] += d
        if prev[t] != 0:
            p = (1 - q) * p
            p[0] = q
        p = p[p > 0]
        out.append(-(p * np.log(p)).sum())
    return np.array(out)


def test_realised_entropy_matches_explicit_distributions():
    spec = synthetic.SyntheticSpec(vocab_size=64, n_tokens=3000, seed=11, doc_len=15)
    x = synthetic.generate(spec)
    h = explicit_entropies(spec, x)
    assert synthetic.realised_entropy(spec, x) == pytest.approx(h.mean(), abs=1e-10)
    assert synthetic.realised_entropy(spec, x, start=2000) == pytest.approx(h[2000:].mean(), abs=1e-10)


def test_entropy_rate_of_none_is_closed_form():
    spec = synthetic.SyntheticSpec(vocab_size=300, structure="none", doc_len=50, zipf_a=0.9)
    pi = zipf(spec)[1:]
    h_pi = -(pi * np.log(pi)).sum()
    q, L = 1 / 50, 50
    h_q = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    expected = h_pi / (L + 1) + L / (L + 1) * (h_q + (1 - q) * h_pi)
    assert synthetic.entropy_rate(spec) == pytest.approx(expected, abs=1e-8)


def test_entropy_rate_matches_long_run_average():
    spec = synthetic.SyntheticSpec(vocab_size=128, n_tokens=1_000_000, seed=5, doc_len=40)
    x = synthetic.generate(spec)
    assert synthetic.entropy_rate(spec) == pytest.approx(synthetic.realised_entropy(spec, x), abs=0.01)


def test_entropy_rate_is_skipped_for_large_vocabularies():
    assert synthetic.entropy_rate(synthetic.SyntheticSpec(vocab_size=synthetic.MAX_EXACT_VOCAB + 1)) is None


# ------------------------------------------------------------------------ synthetic corpus


def test_synthetic_corpus_default(tmp_path):
    corpus = SyntheticCorpus(SyntheticCorpus.Params()).load(tmp_path)
    full = torch.cat([corpus.train, corpus.val]).numpy()
    assert np.array_equal(full, synthetic.generate(synthetic.SyntheticSpec()))
    assert corpus.vocab_size == 512 and corpus.eos_id == 0 and corpus.tokenizer_path is None
    assert corpus.train.dtype == torch.int64
    nominal = 400_000 - round(400_000 * 0.05)
    assert nominal <= corpus.train.numel() <= nominal + 10_000
    assert corpus.train[-1] == 0  # validation starts at a document boundary
    info = corpus.info
    assert info["n_train"] == corpus.train.numel() and info["n_val"] == corpus.val.numel()
    spec = synthetic.SyntheticSpec()
    val_h = explicit_entropies(spec, full, start=corpus.train.numel())
    assert info["val_entropy_bound_nats"] == pytest.approx(val_h.mean(), abs=1e-9)
    freq = np.bincount(corpus.train.numpy(), minlength=512) / corpus.train.numel()
    freq = freq[freq > 0]
    assert info["unigram_entropy_nats"] == pytest.approx(-(freq * np.log(freq)).sum(), rel=1e-12)
    assert info["entropy_rate_nats"] < info["unigram_entropy_nats"] < math.log(512)
    json.dumps(info)


def test_synthetic_params_are_validated():
    with pytest.raises(ValueError):
        SyntheticCorpus.Params(val_fraction=0.6)
    with pytest.raises(ValueError):
        SyntheticCorpus.Params(structure="fancy")


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=8, max_size=200), frac=st.floats(0.01, 0.5))
def test_split_tail_is_a_tail_cut_at_a_nearby_eos(tokens, frac):
    stream = np.array(tokens)
    n_val = max(1, round(stream.size * frac))
    cut = stream.size - n_val
    window = stream[cut: cut + n_val // 2]
    expected = cut + (int(np.argmax(window == 0)) + 1 if (window == 0).any() else 0)
    if expected < 2 or stream.size - expected < 2:
        with pytest.raises(InputError, match="too few"):
            split_tail(stream, frac, 0, "test")
        return
    train, val = split_tail(stream, frac, 0, "test")
    assert np.array_equal(np.concatenate([train, val]), stream)
    assert train.size == expected


# ----------------------------------------------------------------------------- text-files

DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Ünïcödé text — with dashes\nand lines.",
        "def f(x):\n    return x * 2\n", "Numbers 12345 and symbols #@!"]


def write_text_folder(root):
    root.mkdir()
    with (root / "a.jsonl").open("w") as f:
        for doc in DOCS[:2]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n\n")
    (root / "b.txt").write_text(DOCS[2])
    (root / "sub").mkdir()
    (root / "sub" / "c.txt").write_text(DOCS[3])
    (root / "ignored.csv").write_text("not,a,document")


def split_documents(stream: np.ndarray, eos: int) -> list[list[int]]:
    bounds = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], bounds[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, bounds)]


def test_text_files_trains_bpe_and_round_trips(tmp_path):
    write_text_folder(tmp_path / "data")
    corpus = TextFilesCorpus(TextFilesCorpus.Params(path=tmp_path / "data", vocab_size=300, val_fraction=0.2)
                             ).load(tmp_path / "work")
    assert corpus.tokenizer_path == tmp_path / "work" / "tokenizer.json"
    tok = Tokenizer.from_file(str(corpus.tokenizer_path))
    assert tok.token_to_id("<|endoftext|>") == corpus.eos_id
    assert corpus.vocab_size == tok.get_vocab_size()
    stream = torch.cat([corpus.train, corpus.val]).numpy()
    docs = split_documents(stream, corpus.eos_id)
    assert [tok.decode(d) for d in docs] == DOCS  # sorted files: a.jsonl, b.txt, sub/c.txt
    assert stream[-1] == corpus.eos_id and (stream == corpus.eos_id).sum() == len(DOCS)

    again = TextFilesCorpus(TextFilesCorpus.Params(path=tmp_path / "data", tokenizer=corpus.tokenizer_path,
                                                   val_fraction=0.2, max_tokens=25)).load(tmp_path / "work2")
    assert torch.cat([again.train, again.val]).tolist() == stream[:25].tolist()
    assert again.eos_id == corpus.eos_id


def test_text_files_reads_an_hf_tokenizer_directory_with_its_eos(tmp_path):
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<s>", "hello", "world", "again"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hello world hello again world hello")
    corpus = TextFilesCorpus(TextFilesCorpus.Params(path=tmp_path / "d", tokenizer=tmp_path / "tok",
                                                    val_fraction=0.3)).load(tmp_path / "w")
    assert corpus.eos_id == 1 and corpus.vocab_size == len(words)
    assert torch.cat([corpus.train, corpus.val]).tolist() == [3, 4, 3, 5, 4, 3, 1]


@pytest.mark.parametrize("setup, needle", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "No files"),
    (lambda root: (root.mkdir(), (root / "e.txt").write_text("")), "contains no text"),
    (lambda root: (root.mkdir(), (root / "e.jsonl").write_text('{"body": "x"}\n')), "e.jsonl:1"),
])
def test_text_files_errors_name_the_path(tmp_path, setup, needle):
    root = tmp_path / "corpus"
    setup(root)
    with pytest.raises(InputError, match=needle) as err:
        TextFilesCorpus(TextFilesCorpus.Params(path=root, vocab_size=300)).load(tmp_path / "w")
    assert str(root) in str(err.value)


def test_text_files_with_a_missing_tokenizer(tmp_path):
    write_text_folder(tmp_path / "data")
    with pytest.raises(InputError, match="nope.json"):
        TextFilesCorpus(TextFilesCorpus.Params(path=tmp_path / "data", tokenizer=tmp_path / "nope.json")
                        ).load(tmp_path / "w")


# ---------------------------------------------------------------------------- token-files


def test_token_files_npy_and_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 100, 500), rng.integers(1, 100, 300).astype(np.int32)
    np.save(tmp_path / "shard_0.npy", a)
    np.save(tmp_path / "shard_1.npy", b.reshape(3, 100))
    params = TokenFilesCorpus.Params(paths=str(tmp_path / "shard_*.npy"), vocab_size=100, eos_id=0, val_fraction=0.1)
    corpus = TokenFilesCorpus(params).load(tmp_path)
    full = np.concatenate([a, b])
    assert corpus.train.tolist() == full[:720].tolist() and corpus.val.tolist() == full[720:].tolist()
    assert corpus.vocab_size == 100 and corpus.eos_id == 0

    save_file({"ids": a.astype(np.int64), "other": np.zeros(2)}, str(tmp_path / "t.safetensors"))
    save_file({"ids": b}, str(tmp_path / "v.safetensors"))
    params = TokenFilesCorpus.Params(paths=[str(tmp_path / "t.safetensors")], val_paths=str(tmp_path / "v.safetensors"),
                                     tensor="ids", vocab_size=100, eos_id=0)
    corpus = TokenFilesCorpus(params).load(tmp_path)
    assert corpus.train.tolist() == a.tolist() and corpus.val.tolist() == b.tolist()


def test_token_files_errors(tmp_path):
    np.save(tmp_path / "big.npy", np.array([1, 2, 517, 3, 4]))
    with pytest.raises(InputError, match="517"):
        TokenFilesCorpus(TokenFilesCorpus.Params(paths=str(tmp_path / "big.npy"), vocab_size=512, eos_id=0)
                         ).load(tmp_path)
    with pytest.raises(InputError, match="missing_"):
        TokenFilesCorpus(TokenFilesCorpus.Params(paths=str(tmp_path / "missing_*.npy"), vocab_size=512, eos_id=0)
                         ).load(tmp_path)
    np.save(tmp_path / "float.npy", np.ones(10))
    with pytest.raises(InputError, match="integers"):
        TokenFilesCorpus(TokenFilesCorpus.Params(paths=str(tmp_path / "float.npy"), vocab_size=512, eos_id=0)
                         ).load(tmp_path)
    save_file({"ids": np.arange(10)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(InputError, match="'ids'"):
        TokenFilesCorpus(TokenFilesCorpus.Params(paths=str(tmp_path / "s.safetensors"), vocab_size=512, eos_id=0)
                         ).load(tmp_path)
    with pytest.raises(ValueError):
        TokenFilesCorpus.Params(paths="x.npy", vocab_size=10, eos_id=10)


# ---------------------------------------------------------------------------- hf-dataset


def test_hf_dataset_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(InputError, match=r"pip install 'ablate\[datasets\]'"):
        HFDatasetCorpus(HFDatasetCorpus.Params(path=tmp_path, vocab_size=300)).load(tmp_path / "w")


def fake_datasets_module(splits: dict[str, list[dict]]):
    """A stand-in for the `datasets` package: load_from_disk returns a DatasetDict of lists."""
    module = types.ModuleType("datasets")

    class Dataset(list):
        @property
        def column_names(self):
            return sorted(self[0])

    class DatasetDict(dict):
        pass

    module.Dataset, module.DatasetDict = Dataset, DatasetDict
    module.load_from_disk = lambda path: DatasetDict({k: Dataset(v) for k, v in splits.items()})
    return module


def test_hf_dataset_reads_the_split_and_field(tmp_path, monkeypatch):
    rows = [{"content": d, "n": i} for i, d in enumerate(DOCS)]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module({"train": rows, "test": rows[:1]}))
    corpus = HFDatasetCorpus(HFDatasetCorpus.Params(path=tmp_path, text_field="content", vocab_size=300,
                                                    val_fraction=0.2)).load(tmp_path / "w")
    tok = Tokenizer.from_file(str(corpus.tokenizer_path))
    docs = split_documents(torch.cat([corpus.train, corpus.val]).numpy(), corpus.eos_id)
    assert [tok.decode(d) for d in docs] == DOCS
    with pytest.raises(InputError, match="'validation'"):
        HFDatasetCorpus(HFDatasetCorpus.Params(path=tmp_path, split="validation", text_field="content",
                                               vocab_size=300)).load(tmp_path / "w2")
    with pytest.raises(InputError, match="'text'"):
        HFDatasetCorpus(HFDatasetCorpus.Params(path=tmp_path, vocab_size=300)).load(tmp_path / "w3")


def test_corpora_are_registered_through_the_entry_point():
    registry = load_registry()
    assert {"synthetic", "text-files", "token-files", "hf-dataset"} <= set(registry.names("corpus"))
    assert registry.get("corpus", "synthetic") is SyntheticCorpus
