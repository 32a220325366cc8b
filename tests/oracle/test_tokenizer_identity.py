"""Tokenizer identity, not size (reference §12): a corpus made with one tokenizer and a teacher
with another of the same size are refused before any work, showing sample strings with both id
sequences; `tokenizer_mismatch = "allow"` runs them and the report carries a banner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from ablate.oracle import tokenizer_identity
from ablate.errors import SpecError
from ablate_builtins.teachers import HFCausalLMTeacher, LlamaLocalTeacher
from cli_run import ablate_in
from micro_spec import MICRO_SPEC

V = 40
WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(2, V)]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def save_tokenizer(directory: Path, order: list[str]) -> Path:
    """A word-level tokenizer with id i ↦ order[i], saved as directory/tokenizer.json."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(order)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def other_order() -> list[str]:
    """The same words under other ids; only the special ids 0–1 agree (like Mistral vs Llama-2)."""
    perm = np.random.default_rng(0).permutation(np.arange(2, V))
    return WORDS[:2] + [WORDS[i] for i in perm]


def save_teacher(directory: Path, order: list[str]) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(directory, order)


def mismatched_setup(tmp_path: Path) -> None:
    """tok_a made the corpus; the teacher ships a tokenizer of the same size with another id map."""
    save_tokenizer(tmp_path / "tok_a", WORDS)
    save_teacher(tmp_path / "teacher", other_order())
    ids = np.random.default_rng(1).integers(2, V, size=6000)
    ids[::50] = 1  # EOS
    np.save(tmp_path / "shard.npy", ids.astype(np.int32))
    corpus = f'plugin = "token-files"\npaths = ["shard.npy"]\nvocab_size = {V}\neos_id = 1\ntokenizer = "tok_a"'
    teacher = 'plugin = "hf-causal-lm"\nmodel = "teacher"'
    (tmp_path / "spec.toml").write_text(MICRO_SPEC.format(name="tokid", corpus=corpus, teacher=teacher))


def test_equal_size_different_id_maps_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    mismatched_setup(tmp_path)
    for command in (["plan", "spec.toml"], ["run", "spec.toml", "--quiet", "--device", "cpu"]):
        assert ablate_in(tmp_path, monkeypatch, *command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "map to different tokens although both have the same number of entries" in err
        a, b = (tokenizer_identity.describe(p)["digest"] for p in (tmp_path / "tok_a/tokenizer.json",
                                                                   tmp_path / "teacher/tokenizer.json"))
        assert a != b and a in err and b in err
        # sample strings with both id sequences: a text of corpus words, its corpus ids and the teacher's
        samples = err.split("Examples (text: corpus ids | teacher ids): ")[1].split(". Fix:")[0].split("; ")
        assert len(samples) == 3
        text, rest = samples[0].split(": corpus ")
        ours, theirs = (json.loads(s) for s in rest.split(" | teacher "))
        words = text.strip("'").split()
        assert [WORDS.index(w) for w in words] == ours and [other_order().index(w) for w in words] == theirs
        assert ours != theirs and 'tokenizer_mismatch = "allow"' in err and "Traceback" not in err
    assert not list(tmp_path.glob(".ablate-cache/corpus-*"))  # refused before the corpus was read


def test_spec_problems_gives_validate_the_same_refusal(tmp_path, monkeypatch):
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec

    mismatched_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    registry = load_registry([])
    with pytest.raises(SpecError) as refused:  # load_spec (so `ablate validate`) runs spec_problems
        load_spec("spec.toml", registry=registry)
    [(where, message)] = refused.value.problems
    assert where == "teacher" and "map to different tokens" in message
    allowed = load_spec("spec.toml", ['teacher.tokenizer_mismatch="allow"'], registry=registry)
    assert tokenizer_identity.spec_problems(allowed, registry) == []


def test_allowed_mismatch_runs_and_the_report_carries_the_banner(tmp_path, monkeypatch):
    mismatched_setup(tmp_path)
    # the random-weight teacher also fails its health check, as the reference's would: allow both
    assert ablate_in(tmp_path, monkeypatch, "run", "spec.toml", "--quiet", "--device", "cpu",
                     "--set", 'teacher.tokenizer_mismatch="allow"', "--set", 'oracle.teacher_health="allow"') == 0
    results = json.loads((tmp_path / "runs/tokid/results.json").read_text())
    tok = results["oracle"]["tokenizers"]
    assert tok["match"] is False and tok["tokenizer_mismatch"] == "allow"
    assert tok["corpus"]["digest"] == tokenizer_identity.describe(tmp_path / "tok_a/tokenizer.json")["digest"]
    assert tok["teacher"]["digest"] == tokenizer_identity.describe(tmp_path / "teacher/tokenizer.json")["digest"]
    assert tok["corpus"]["entries"] == tok["teacher"]["entries"] == V
    report = (tmp_path / "reports/tokid.md").read_text()
    head = report.split("\n## ")[0]
    assert "WARNING: the corpus and the teacher use DIFFERENT tokenizers" in head
    assert tok["corpus"]["digest"] in head and tok["teacher"]["digest"] in head
    assert "**Tokenizers** (id→token digests)" in report and "**DIFFERENT**" in report


def test_identical_maps_match_and_unknown_sides_are_not_compared(tmp_path):
    corpus_file = save_tokenizer(tmp_path / "a", WORDS)
    save_teacher(tmp_path / "same", WORDS)
    same = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "same")))
    record = tokenizer_identity.check(corpus_file, same)
    assert record["match"] is True and record["corpus"]["digest"] == record["teacher"]["digest"]
    assert tokenizer_identity.check(None, same)["match"] is None  # e.g. the synthetic corpus
    assert tokenizer_identity.check(corpus_file, LlamaLocalTeacher(LlamaLocalTeacher.Params()))["match"] is True
    save_teacher(tmp_path / "other", other_order())
    other = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "other")))
    with pytest.raises(SpecError, match="map to different tokens"):
        tokenizer_identity.check(corpus_file, other)
    allowed = HFCausalLMTeacher(HFCausalLMTeacher.Params(model=str(tmp_path / "other"), tokenizer_mismatch="allow"))
    assert tokenizer_identity.check(corpus_file, allowed)["match"] is False


def test_every_teacher_accepts_tokenizer_mismatch_and_it_is_not_part_of_the_teacher_key():
    from ablate.api.components import Teacher
    from ablate.pipeline.stages import teacher_key

    class Custom(Teacher):
        name = "custom"

    assert Custom.Params().tokenizer_mismatch == "error"
    for mode in ("error", "allow"):
        assert LlamaLocalTeacher.Params(tokenizer_mismatch=mode).tokenizer_mismatch == mode
    with pytest.raises(ValueError):
        LlamaLocalTeacher.Params(tokenizer_mismatch="ignore")
    keys = {teacher_key(LlamaLocalTeacher(LlamaLocalTeacher.Params(tokenizer_mismatch=m)), "c", 0)
            for m in ("error", "allow")}
    assert len(keys) == 1


def test_validate_refuses_the_mismatch_showing_sample_strings(tmp_path, monkeypatch, capsys):
    from cli_run import ablate_in

    mismatched_setup(tmp_path)
    assert ablate_in(tmp_path, monkeypatch, "validate", "spec.toml") == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "map to different tokens" in err and "corpus [2, 5, 8, 11] | teacher" in err and "Traceback" not in err
