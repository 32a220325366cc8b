"""Teacher health (reference §12), measured in the oracle pass at no extra forward cost: a teacher
reading its own ids predicts the corpus far better than its unigram entropy; the same teacher fed
a fixed permutation of its ids (another tokenizer's ids, no tokenizer file to compare) sits near
ln V, and the oracle stage stops with the health error unless allowed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ablate.errors import SpecError
from ablate.oracle.build import NextTokenScore
from ablate.config.spec import spec_from_dict
from ablate.pipeline.stages import load_corpus
from cli_run import ablate_in
from micro_spec import MICRO_SPEC

V = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def test_next_token_score_is_the_cross_entropy_of_the_shifted_tokens():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 11, 7, generator=g) * 3, torch.randint(0, 7, (3, 11), generator=g)
    score = NextTokenScore("cpu", chunk=4)  # chunks smaller than a sequence
    score.add(logits, tokens)
    score.add(logits[:1, :5], tokens[:1, :5])
    pred = torch.cat([logits[:, :-1].reshape(-1, 7), logits[0, :4]]).double()
    target = torch.cat([tokens[:, 1:].reshape(-1), tokens[0, 1:5]])
    stats = score.stats()
    assert stats["teacher_tokens"] == 3 * 10 + 4
    assert stats["teacher_ce"] == pytest.approx(F.cross_entropy(pred, target).item(), abs=1e-6)
    assert stats["teacher_top1"] == (pred.argmax(1) == target).double().mean().item()


def test_the_bound_is_a_checked_expression():
    raw = {"name": "x", "corpus": {"plugin": "synthetic"}, "teacher": {"plugin": "llama-local"},
           "cells": [{"name": "c"}], "oracle": {"teacher_max_ce": "unigram_entropy + ln_v"}}
    with pytest.raises(SpecError, match=r"oracle.teacher_max_ce.*unknown name"):
        spec_from_dict(raw)
    raw["oracle"] = {"teacher_max_ce": "log_vocab - 0.5", "teacher_health": "allow"}
    assert spec_from_dict(raw).oracle.teacher_max_ce == "log_vocab - 0.5"


OWN_CORPUS = f'plugin = "synthetic"\nvocab_size = {V}\nn_tokens = 20_000'
LLAMA = ('plugin = "llama-local"\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n'
         'intermediate_size = 64\nsteps = 60\nbatch = 8\nseq_len = 32\nlr = 1e-2\nwarmup = 5')


def run(tmp_path: Path, monkeypatch, name: str, corpus: str, teacher: str, *extra: str) -> int:
    (tmp_path / f"{name}.toml").write_text(MICRO_SPEC.format(name=name, corpus=corpus, teacher=teacher))
    return ablate_in(tmp_path, monkeypatch, "run", f"{name}.toml", "--quiet", "--device", "cpu", *extra)


def test_a_teacher_fed_permuted_ids_fails_its_health_check_and_on_its_own_ids_passes(tmp_path, monkeypatch, capsys):
    # the teacher (a small Llama trained on the corpus) reading its own ids: far below the unigram entropy
    assert run(tmp_path, monkeypatch, "own", OWN_CORPUS, LLAMA) == 0
    own = json.loads((tmp_path / "runs/own/results.json").read_text())["oracle"]
    health = own["teacher_health"]
    assert health["passed"] is True and health["teacher_max_ce"] == "unigram_entropy"
    assert own["teacher_ce"] < health["unigram_entropy"] - 0.2 and health["log_vocab"] == pytest.approx(math.log(V))
    assert own["teacher_tokens"] > 0 and 0 < own["teacher_top1"] < 1
    assert "It passes the bound" in (tmp_path / "reports/own.md").read_text()

    # the same weights fed a fixed permutation of the ids (EOS kept), with no tokenizer file to compare
    corpus = load_corpus(next(tmp_path.glob(".ablate-cache/corpus-*")))
    perm = torch.cat([torch.zeros(1, dtype=torch.long),
                      1 + torch.randperm(V - 1, generator=torch.Generator().manual_seed(0))])
    np.save(tmp_path / "permuted.npy", perm[torch.cat([corpus.train, corpus.val])].numpy())
    weights = next(tmp_path.glob(".ablate-cache/teacher-*/hf"))
    permuted = f'plugin = "token-files"\npaths = ["permuted.npy"]\nvocab_size = {V}\neos_id = 0\nval_fraction = 0.05'
    teacher = f'plugin = "hf-causal-lm"\nmodel = "{weights}"'
    capsys.readouterr()
    assert run(tmp_path, monkeypatch, "permuted", permuted, teacher) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Teacher 'hf-causal-lm' predicts the corpus's next tokens with a cross-entropy of" in err
    assert "no better than [oracle] teacher_max_ce = 'unigram_entropy'" in err and 'teacher_health = "allow"' in err
    assert "Traceback" not in err

    # allowed: the run goes on from the cached stages (the oracle too) and the report says what happened
    assert run(tmp_path, monkeypatch, "permuted", permuted, teacher, "--set", 'oracle.teacher_health="allow"') == 0
    results = json.loads((tmp_path / "runs/permuted/results.json").read_text())
    assert all(results["stages"][s]["cached"] for s in ("corpus", "backbone", "teacher", "oracle"))
    bad = results["oracle"]
    assert bad["teacher_health"]["passed"] is False and bad["teacher_ce"] >= bad["teacher_health"]["bound"]
    assert abs(bad["teacher_ce"] - math.log(V)) < 0.6 < bad["teacher_ce"] - own["teacher_ce"]  # near ln V
    assert bad["teacher_top1"] < own["teacher_top1"] / 3
    assert bad["tokenizers"]["match"] is None  # nothing to compare: only the health check caught it
    report = (tmp_path / "reports/permuted.md").read_text()
    assert "WARNING: the teacher failed its health check" in report.split("\n## ")[0]
    assert "It **fails** the bound" in report
