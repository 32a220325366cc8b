"""`ablate bench --size small --device cpu` end to end: the two cell steps compute the same loss
on the same batch, the FLOP counts agree with first principles and with torch's flop counter,
and the oracle figures describe the pass that ran. No timing asserts."""

from __future__ import annotations

import io
import json
from argparse import Namespace

import pytest
import torch
from rich.console import Console

from ablate.training import bench
from ablate.errors import InputError


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    console = Console(file=io.StringIO(), width=200)
    args = Namespace(size="small", device="cpu", steps=None, out=str(out), skip_oracle=False)
    assert bench.bench_command(args, console) == 0
    printed = console.file.getvalue()
    assert "cell step, ablate" in printed and "oracle pass" in printed
    return json.loads(out.read_text())


def test_both_steps_compute_the_same_loss_on_the_same_batch(result):
    check = result["cells"]["loss_check"]
    assert result["cells"]["precision"] == "fp32"
    assert check["ok"] is True and check["kl_rows_equal"] is True
    assert check["tolerance"] == pytest.approx(1e-4)
    assert abs(check["ablate_loss"] - check["naive_loss"]) <= 1e-4 * abs(check["naive_loss"])
    assert check["naive_loss"] > 0


def test_backbone_and_lm_head_flops_match_torchs_flop_counter():
    """The analytic FLOPs of the frozen backbone's forward and the LM head, against a second
    method: torch.utils.flop_counter counting the same forward on the bench's small shapes. The
    attention runs as SDPA's math kernel, whose products the counter sees (bmm); it computes all
    T² query–key pairs where the analytic count charges the causal half, so the half is added back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = bench.SIZES["small"]
    inputs = bench.make_cell_inputs(size, torch.device("cpu"))
    student = bench.make_student(size, inputs, torch.device("cpu"), router=False)
    tokens = inputs.train[: size.batch * size.seq_len].view(size.batch, size.seq_len)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        student.backbone.logits(student.backbone(tokens))
    c = size.backbone
    analytic = bench.cell_step_flops(size, router=False)
    causal_half = c.num_layers * 2 * size.batch * c.num_query_heads * size.seq_len ** 2 * c.head_dim
    assert counter.get_total_flops() == analytic["backbone_forward"] + causal_half + analytic["lm_head"] / 2


def test_oracle_figures(result):
    o, dims = result["oracle"], result["dimensions"]
    size = bench.SIZES["small"]
    assert o["tokens"] == size.oracle_batches * size.oracle_batch * size.oracle_seq_len
    assert o["tokens_per_s"] == pytest.approx(o["tokens"] / o["seconds"], rel=1e-12)
    assert o["teacher_forward_tokens_per_s"] > 0
    t = dims["teacher"]
    h, layers, vocab, T = t["hidden_size"], t["num_hidden_layers"], dims["backbone"]["vocab_size"], o["seq_len"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * t["intermediate_size"]  # q, o; k, v; MLP
    attention = layers * 2 * T * h  # heads · head_dim = h; QKᵀ and PV over T/2 keys on average
    assert o["flops_per_token"] == 2 * (layers * per_layer + h * vocab) + attention


def test_step_flops_parts_from_first_principles(result):
    flops, dims = result["cells"]["flops"], result["dimensions"]
    c = dims["backbone"]
    P, d, V = dims["batch"] * dims["seq_len"], c["hidden_dim"], c["vocab_size"]
    assert flops["lm_head"] == 4 * P * d * V  # forward + input gradient, E frozen
    assert flops["router"] == 6 * P * d * d + 4 * P * d * V
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
    off = result["cells"]["flops_router_off"]
    assert "router" not in off and off["total"] == pytest.approx(flops["total"] - flops["router"])
    B, T, hd = dims["batch"], dims["seq_len"], c["head_dim"]
    qw, kvw = c["num_query_heads"] * hd, c["num_kv_heads"] * hd
    gemm = 2 * P * (2 * d * qw + 2 * d * kvw + 3 * d * c["ffn_dim"])
    attention = 2 * B * c["num_query_heads"] * T * T * hd  # causal half of QKᵀ and PV
    assert flops["backbone_forward"] == c["num_layers"] * (gemm + attention)
    # backward: activation gradients through the layers after the first injection only
    grad_layers = c["num_layers"] - 1 - min(dims["engram"]["inject_layers"])
    assert flops["backbone_backward"] == pytest.approx(grad_layers * (gemm + 2.5 * attention))


def test_skip_oracle_and_bad_arguments(tmp_path):
    console = Console(file=io.StringIO())
    out = tmp_path / "b.json"
    args = Namespace(size="small", device="cpu", steps=1, out=str(out), skip_oracle=True)
    assert bench.bench_command(args, console) == 0
    data = json.loads(out.read_text())
    assert data["oracle"] is None and data["dimensions"]["timed_steps"] == 1
    with pytest.raises(InputError, match="--steps"):
        bench.run_bench("small", torch.device("cpu"), steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            bench._resolve_device("cuda")


def test_the_fused_group_gives_each_cell_its_separate_loss(result):
    """Six cells (two router-off CE, four router-on KL+CE) through one fused forward: every cell's
    loss on the fixed batch equals its own CellRun's (CPU fp32, the same permutations)."""
    fused = result["fused"]
    check = fused["loss_check"]
    assert fused["cells"] == 6 and fused["routers"].count(True) == 4 and check["ok"] is True
    assert len(check["fused_losses"]) == len(check["separate_losses"]) == 6
    for f, s in zip(check["fused_losses"], check["separate_losses"]):
        assert s > 0 and abs(f - s) <= 1e-6 * s
