"""Built-in teachers and the generic pretraining loop: HF directories and cache lookups without
network, vocabulary and layer checks, the locally trained Llama and the same-arch teacher,
each compared against an independent forward pass."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ablate.api.components import TeacherContext
from ablate.errors import InputError
from ablate.training.lm_pretrain import lr_multiplier, pretrain_lm
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import save_backbone
from ablate.api.plugins import load_registry
from ablate_builtins.corpora import SyntheticCorpus
from ablate_builtins.teachers import (HFCausalLMTeacher, LlamaLocalTeacher, SameArchTeacher, TinyLlamaTeacher,
                                      resolve_layer)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test runs offline with an empty, private HF cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def save_tiny_llama(directory: Path, vocab: int = 50, tokenizer_vocab: int | None = 50,
                    layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    if tokenizer_vocab is not None:
        words = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, tokenizer_vocab)}
        raw = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    return model


def context(tmp_path: Path, vocab: int = 50) -> TeacherContext:
    corpus = SyntheticCorpus(SyntheticCorpus.Params(vocab_size=vocab, n_tokens=5_000)).load(tmp_path / "corpus")
    return TeacherContext(corpus=corpus, workdir=tmp_path / "teacher", device=CPU, seed=0)


def reference_outputs(directory: Path, tokens: torch.Tensor):
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True, use_cache=False)


# ------------------------------------------------------------------------- layer indices


@settings(max_examples=50, deadline=None)
@given(num_layers=st.integers(1, 40), layer=st.integers(-45, 45))
def test_resolve_layer_is_python_indexing_of_the_hidden_state_tuple(num_layers, layer):
    states = list(range(num_layers + 1))
    if -len(states) <= layer < len(states):
        assert resolve_layer(layer, num_layers, "m") == states[layer]
    else:
        with pytest.raises(InputError, match=str(layer)):
            resolve_layer(layer, num_layers, "m")


# --------------------------------------------------------------------------- hf-causal-lm


@pytest.mark.parametrize("layer", [-4, -2, -1, 0, 1, 3])  # every hidden state of 3 blocks, the final norm's included
def test_hf_directory_loads_through_from_pretrained(tmp_path, layer):
    save_tiny_llama(tmp_path / "m")
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m"), layer=layer))
    teacher.check(50)
    loaded = teacher.load(context(tmp_path))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    hidden, logits = loaded.forward(tokens)
    ref = reference_outputs(tmp_path / "m", tokens)
    assert hidden.shape == (2, 9, 32) and logits.shape == (2, 9, 50)
    assert hidden.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(hidden, ref.hidden_states[layer])
    torch.testing.assert_close(logits, ref.logits)
    assert (loaded.vocab_size, loaded.hidden_size) == (50, 32)
    assert loaded.info | {"layer": layer, "hidden_size": 32, "num_layers": 3, "vocab_size": 50,
                          "dtype": "float32"} == loaded.info


def test_a_permuted_vocabulary_reads_and_answers_through_one_fixed_map(tmp_path):
    """vocab_permutation_seed (reference §12 on purpose): the teacher reads σ(tokens) and its logit j
    is the model's logit σ(j), σ a fixed permutation of the vocabulary; the same map every load."""
    save_tiny_llama(tmp_path / "m")
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m"), vocab_permutation_seed=3))
    loaded = teacher.load(context(tmp_path))
    sigma = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.permutation, sigma) and not torch.equal(sigma, torch.arange(50))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    hidden, logits = loaded.forward(tokens)
    ref = reference_outputs(tmp_path / "m", sigma[tokens])
    torch.testing.assert_close(hidden, ref.hidden_states[-2])
    for j in range(50):
        torch.testing.assert_close(logits[..., j], ref.logits[..., sigma[j]])
    assert loaded.info["vocab_permutation_seed"] == 3
    assert torch.equal(teacher.load(context(tmp_path)).permutation, sigma)


def test_hf_bfloat16_returns_float_tensors(tmp_path):
    save_tiny_llama(tmp_path / "m")
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m"), dtype="bfloat16"))
    loaded = teacher.load(context(tmp_path))
    hidden, logits = loaded.forward(torch.zeros(1, 4, dtype=torch.long))
    assert loaded.info["dtype"] == "bfloat16" and hidden.dtype == logits.dtype == torch.float32


def test_hf_vocab_mismatch_names_both_sizes(tmp_path):
    save_tiny_llama(tmp_path / "m")
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m")))
    with pytest.raises(InputError, match=r"vocab_size 50.*has 512 tokens"):
        teacher.check(512)
    save_tiny_llama(tmp_path / "t", vocab=50, tokenizer_vocab=40)
    with pytest.raises(InputError, match=r"40 tokens.*has 50"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "t"))).check(50)


def test_hf_layer_out_of_range_fails_in_check(tmp_path):
    save_tiny_llama(tmp_path / "m", layers=3)
    with pytest.raises(InputError, match=r"-4\.\.3"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m"), layer=4)).check(50)


def test_hf_directory_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "empty"))).check(50)
    save_tiny_llama(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no complete weights"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "m"))).check(50)


def test_uncached_hub_id_says_where_it_looked(tmp_path):
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model="some-org/not-downloaded", revision="v1"))
    with pytest.raises(InputError) as err:
        teacher.check(50)
    message = str(err.value)
    assert str(tmp_path / "hf_home" / "hub") in message
    assert 'model = "/path/to/dir"' in message
    assert "huggingface-cli download some-org/not-downloaded --revision v1" in message
    assert "HF_HUB_OFFLINE" in message


def test_tinyllama_defaults_and_uncached_error(tmp_path):
    params = TinyLlamaTeacher.Params()
    assert (params.model, params.layer, params.revision) == ("TinyLlama/TinyLlama_v1.1", -2, "main")
    with pytest.raises(InputError, match="TinyLlama/TinyLlama_v1.1"):
        TinyLlamaTeacher(params).check(32000)


def test_cached_hub_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    cache = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_tiny_llama(repo / "snapshots" / commit)
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(model="org/tiny"))
    teacher.check(50)
    loaded = teacher.load(context(tmp_path))
    tokens = torch.arange(10).view(1, 10)
    torch.testing.assert_close(loaded.forward(tokens)[1], reference_outputs(repo / "snapshots" / commit, tokens).logits)
    assert loaded.info["resolved"] == str(repo / "snapshots" / commit)
    with pytest.raises(InputError, match="revision 'other'"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(model="org/tiny", revision="other")).check(50)


# ---------------------------------------------------------------------------- llama-local


def test_llama_local_trains_saves_and_loads_like_any_hf_model(tmp_path):
    corpus = SyntheticCorpus(SyntheticCorpus.Params(n_tokens=60_000)).load(tmp_path / "corpus")
    consumed = []
    ctx = TeacherContext(corpus=corpus, workdir=tmp_path / "teacher", device=CPU, seed=0, progress=consumed.append)
    params = LlamaLocalTeacher.Params(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64, steps=150, batch=8, seq_len=32, lr=1e-2, warmup=10)
    teacher = LlamaLocalTeacher(params)
    teacher.check(corpus.vocab_size)
    result = teacher.prepare(ctx)
    assert sum(consumed) == 150 * 8 * 32 == result["train_tokens"]
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(512) == pytest.approx(result["ln_vocab"])

    # validation CE recomputed in float64 on the documented windows: non-overlapping, from the start
    model = LlamaForCausalLM.from_pretrained(tmp_path / "teacher" / "hf", dtype=torch.float32).eval()
    n = (corpus.val.numel() - 1) // 32
    windows = torch.stack([corpus.val[i * 32: i * 32 + 33] for i in range(n)])
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits.double()
    ce = F.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1)).item()
    assert result["val_loss"] == pytest.approx(ce, abs=1e-4)

    loaded = teacher.load(ctx)
    tokens = corpus.val[:40].view(2, 20)
    hidden, logits = loaded.forward(tokens)
    with torch.no_grad():
        ref = model(input_ids=tokens, output_hidden_states=True, use_cache=False)
    assert hidden.shape == (2, 20, 32) and logits.shape == (2, 20, 512)
    torch.testing.assert_close(hidden, ref.hidden_states[-2])
    torch.testing.assert_close(logits, ref.logits)
    assert loaded.info["source"] == "llama-local" and loaded.info["layer"] == -2


def test_llama_local_params_are_validated():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaLocalTeacher.Params(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="out of range"):
        LlamaLocalTeacher.Params(num_layers=4, layer=-6)


def test_llama_local_load_before_prepare_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="did not finish"):
        LlamaLocalTeacher(LlamaLocalTeacher.Params()).load(context(tmp_path, vocab=512))


# ------------------------------------------------------------------------------ same-arch

SMALL = dict(hidden_dim=32, num_layers=4, num_query_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=48, max_seq_len=64)


def layer_outputs(backbone: Backbone, tokens: torch.Tensor) -> list[torch.Tensor]:
    """HF-style hidden_states recomputed independently: embeddings, each layer, final norm last."""
    outs = [backbone.embed(tokens)]

    def grab(i, h):
        outs.append(h)
        return h

    with torch.no_grad():
        h = backbone(tokens, after_layer=grab)
        outs[-1] = backbone.final_norm(h)
    return outs


@pytest.mark.parametrize("layer", [-2, -1, 0, 2])
def test_same_arch_trains_and_exposes_hf_style_layers(tmp_path, layer):
    ctx = context(tmp_path, vocab=64)
    teacher = SameArchTeacher(SameArchTeacher.Params(**SMALL, steps=20, batch=4, seq_len=16, layer=layer))
    teacher.check(64)
    result = teacher.prepare(ctx)
    assert math.isfinite(result["val_loss"])
    loaded = teacher.load(ctx)
    tokens = ctx.corpus.val[:30].view(2, 15)
    hidden, logits = loaded.forward(tokens)

    from ablate.model.checkpoint import load_backbone
    backbone = load_backbone(ctx.workdir / "backbone.safetensors").eval()
    expected = layer_outputs(backbone, tokens)[layer]
    with torch.no_grad():
        expected_logits = backbone.logits(backbone(tokens))
    assert hidden.shape == (2, 15, 32) and logits.shape == (2, 15, 64)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(logits, expected_logits)
    assert (loaded.vocab_size, loaded.hidden_size) == (64, 32)


def test_same_arch_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(vocab_size=64, **SMALL)).eval()
    save_backbone(backbone, tmp_path / "bb.safetensors")
    teacher = SameArchTeacher(SameArchTeacher.Params(checkpoint=tmp_path / "bb.safetensors", seq_len=16, batch=4))
    teacher.check(64)
    with pytest.raises(InputError, match=r"vocab_size 64.*has 100"):
        teacher.check(100)
    ctx = context(tmp_path, vocab=64)
    result = teacher.prepare(ctx)
    n = (ctx.corpus.val.numel() - 1) // 16
    windows = torch.stack([ctx.corpus.val[i * 16: i * 16 + 17] for i in range(n)])
    with torch.no_grad():
        logits = backbone.logits(backbone(windows[:, :-1])).double()
    ce = F.cross_entropy(logits.reshape(-1, 64), windows[:, 1:].reshape(-1)).item()
    assert result["val_loss"] == pytest.approx(ce, abs=1e-4)
    tokens = ctx.corpus.val[:12].view(1, 12)
    torch.testing.assert_close(teacher.load(ctx).forward(tokens)[0], layer_outputs(backbone, tokens)[-2])
    with pytest.raises(InputError, match="does not exist"):
        SameArchTeacher(SameArchTeacher.Params(checkpoint=tmp_path / "missing.safetensors")).check(64)


def test_same_arch_bad_override_fails_in_check():
    with pytest.raises(InputError, match="num_kv_heads"):
        SameArchTeacher(SameArchTeacher.Params(num_query_heads=4, num_kv_heads=3)).check(64)


# ------------------------------------------------------------------------------ lm_pretrain


@settings(max_examples=50, deadline=None)
@given(steps=st.integers(2, 500), warmup_share=st.floats(0, 0.9), min_ratio=st.floats(0, 1),
       schedule=st.sampled_from(["cosine", "wsd"]))
def test_lr_schedule_shape(steps, warmup_share, min_ratio, schedule):
    warmup = int(steps * warmup_share)
    m = [lr_multiplier(s, steps, warmup, schedule, min_ratio) for s in range(steps)]
    assert m[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = m[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # non-increasing after warmup
    assert all(min_ratio - 1e-12 <= x <= 1 + 1e-12 for x in after)
    if steps - warmup >= 2:
        assert after[-1] == pytest.approx(min_ratio)
    if schedule == "cosine" and steps - warmup >= 2:
        assert after[0] == pytest.approx(1.0)
        mid = warmup + (steps - 1 - warmup) / 2
        if mid == int(mid):
            assert m[int(mid)] == pytest.approx((1 + min_ratio) / 2)
    if schedule == "wsd":
        flat_until = steps - max(1, steps // 10)
        assert all(x == 1.0 for x in m[warmup:flat_until])


def test_pretrain_learns_the_unigram_optimum():
    """A bias-only 'model' can at best predict the train unigram law: its val CE must reach
    the cross-entropy of that law on the validation stream (float64, computed here)."""
    rng = np.random.default_rng(0)
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    stream = torch.from_numpy(rng.choice(5, size=40_000, p=probs))
    train, val = stream[:36_000], stream[36_000:]
    bias = torch.nn.Parameter(torch.zeros(5))
    result = pretrain_lm(lambda t: bias.expand(*t.shape, 5), [bias], train, val, steps=300, batch=8, seq_len=32,
                         lr=0.05, warmup=10, seed=0, device=CPU)
    freq = np.bincount(train.numpy(), minlength=5) / train.numel()
    n = (val.numel() - 1) // 32
    targets = val[1: n * 32 + 1].numpy()
    optimum = -np.log(freq[targets]).mean()
    assert result["val_loss"] == pytest.approx(optimum, abs=0.01)


def test_teachers_are_registered_through_the_entry_point():
    registry = load_registry()
    assert {"hf-causal-lm", "tinyllama", "llama-local", "same-arch"} <= set(registry.names("teacher"))
    assert registry.get("teacher", "llama-local") is LlamaLocalTeacher
