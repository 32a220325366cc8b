"""`ablate bench`'s Muon comparison (batched against per-matrix, measured in the same run) at the
small size on the CPU: equal work (the same updates within tolerance), and the derived figures
follow from the reported ones. No timing asserts."""

from __future__ import annotations

import pytest
import torch

from ablate.training import bench


@pytest.fixture(scope="module")
def muon():
    return bench.bench_muon(bench.SIZES["small"], torch.device("cpu"), steps=2)


def test_batched_and_per_matrix_muon_do_the_same_updates(muon):
    assert muon["matrices"] == 11  # W_r, W_q, W_k, W_v, W_o at two injections, and W_align
    assert muon["shape_groups"] < muon["matrices"]
    for numerics in ("ablate", "upstream"):
        m = muon[numerics]
        assert m["ok"] is True and m["max_relative_update_difference"] <= m["tolerance"]
        assert m["speedup"] == pytest.approx(m["per_matrix_ms_per_step"] / m["batched_ms_per_step"], rel=1e-12)


def test_the_table_shows_the_muon_rows(muon):
    result = {"size": "small", "device": {"name": "cpu"}, "muon": muon,
              "full_matrix_estimate": {"minutes": 1.0, "minutes_with_compilation": 2.0, "excluded": "x"},
              "cells": {k: {"ms_per_step": 1.0, "tokens_per_s": 1.0, "mfu": None, "peak_memory_gib": None,
                            "peak_reserved_gib": None} for k in ("ablate", "naive", "router_off_ablate")}}
    result["cells"].update(ratios={"tokens_per_s": 1.0, "peak_memory": None, "peak_reserved": None},
                           loss_check={"ablate_loss": 1.0, "naive_loss": 1.0, "ok": True})
    from rich.console import Console
    import io

    console = Console(file=io.StringIO(), width=250)
    console.print(bench.render_table(result))
    text = console.file.getvalue()
    assert "Muon step alone, batched" in text and "vs per-matrix" in text
