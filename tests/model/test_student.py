import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from ablate.model.logits import as_tensor
from ablate.errors import InputError
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.student import EngramConfig, Student

SMALL = dict(vocab_size=128, hidden_dim=64, num_layers=8, num_query_heads=4, num_kv_heads=2,
             head_dim=16, ffn_dim=96, max_seq_len=32, layers_per_block=2)


def make(router=False, **engram):
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(**SMALL))
    table = torch.randn(40, 16)
    cfg = EngramConfig(engram_dim=16, num_heads=4, top_k=4, router=router, **engram)
    return Student(backbone, cfg, table)


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def trainable(student):
    return sum(p.numel() for _, p in student.trainable_named_parameters())


def test_tiny_trainable_counts_match_reference():
    for router, expected in ((False, 1_442_562), (True, 1_704_707)):
        with torch.device("meta"):
            student = Student(Backbone(BackboneConfig()), EngramConfig(router=router),
                              torch.empty(10_000, 128))
        student.freeze_backbone()
        assert trainable(student) == expected
    # whole model, router on: 41,298,179 minus the inert legacy module (133,632)
    assert sum(p.numel() for p in student.parameters()) == 41_298_179 - 133_632


def test_freeze_leaves_only_injections_and_router_trainable():
    student = make(router=True)
    student.freeze_backbone()
    names = [n for n, _ in student.trainable_named_parameters()]
    assert names and all(n.startswith(("engram_injections.", "engram_skip_router.")) for n in names)
    assert {n.split(".")[1] for n in names if n.startswith("engram_injections.")} == {"2", "5"}
    assert not any(p.requires_grad for p in student.backbone.parameters())
    assert "table" not in student.state_dict()


def test_closed_gates_and_zero_router_reproduce_the_backbone_exactly():
    student = make(router=True).eval()
    x = tokens()
    with torch.no_grad():
        out = student(x, aux=True, trace=True)
        bare = student.backbone.logits(student.backbone(x))
    assert torch.equal(as_tensor(out.logits), bare)
    assert torch.equal(as_tensor(out.router_logits), torch.zeros(out.router_logits.shape))
    assert torch.equal(out.e, torch.zeros_like(out.e))
    assert set(out.gates) == set(out.vc) == set(out.qd) == set(out.traces) == {2, 5}
    assert all(g.item() == 0.0 for g in out.gates.values())


def test_open_gates_change_logits_unless_inject_mult_is_zero():
    student = make().eval()
    with torch.no_grad():
        for inj in student.engram_injections.values():
            inj.gate.fill_(0.5)
        x = tokens()
        bare = student.backbone.logits(student.backbone(x))
        assert not torch.allclose(as_tensor(student(x).logits), bare)
        assert torch.equal(as_tensor(student(x, inject_mult=0.0).logits), bare)


def test_trace_and_router_input_follow_the_last_inject_layer():
    student = make(router=True, inject_layers=(5, 2))
    with torch.no_grad():
        for inj in student.engram_injections.values():
            inj.gate.fill_(0.5)
        student.engram_skip_router.W_align.weight.normal_()
    out = student(tokens(), trace=True, inject_mult=0.3)
    assert student.router_layer == 5
    assert torch.equal(out.e, out.traces[5].inj)  # before inject_mult
    assert out.traces[5].xattn.indices.shape == (2, 12, 4)
    E = student.backbone.lm_head_weight.detach().double()
    W = student.engram_skip_router.W_align.weight.detach().double()
    expected = 0.1 * (out.e.detach().double() @ W.T) @ E.T
    torch.testing.assert_close(as_tensor(out.router_logits).detach().double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aligned.detach().double(), out.e.detach().double() @ W.T,
                               rtol=1e-4, atol=1e-5)
    assert not out.vc and not out.qd


def test_gradient_order_at_step_zero():
    student = make(router=True)
    student.freeze_backbone()
    router = student.engram_skip_router
    x = tokens(T=13)

    def grads():
        student.zero_grad(set_to_none=True)
        out = student(x[:, :-1])
        F.cross_entropy(as_tensor(out.logits).flatten(0, 1), x[:, 1:].flatten()).backward()
        return router.W_align.weight.grad.abs().sum().item(), router.log_alpha.grad.abs().item()

    # step 0: gate closed ⇒ e = 0 ⇒ no W_align gradient; W_align = 0 ⇒ no log_alpha gradient
    w_align, log_alpha = grads()
    assert w_align == 0.0 and log_alpha == 0.0
    assert student.engram_injections["5"].gate.grad.abs() > 0  # the gate moves first
    # gate open, W_align still zero: W_align moves, log_alpha still flat
    with torch.no_grad():
        student.engram_injections["5"].gate.fill_(0.5)
    w_align, log_alpha = grads()
    assert w_align > 0 and log_alpha == 0.0
    # once W_align ≠ 0, log_alpha gets gradient too
    with torch.no_grad():
        router.W_align.weight.normal_(std=0.1)
    w_align, log_alpha = grads()
    assert log_alpha > 0


@pytest.mark.parametrize("cfg", [dict(inject_layers=(), router=True), dict(inject_layers=(8,)),
                                 dict(inject_layers=(-1,)), dict(inject_layers=(2, 2)),
                                 dict(num_heads=5)])
def test_invalid_engram_configs_are_input_errors(cfg):
    with pytest.raises(InputError):
        Student(Backbone(BackboneConfig(**SMALL)),
                EngramConfig(**{"engram_dim": 16, "num_heads": 4, **cfg}), torch.randn(40, 16))


def test_set_table_validates_and_swaps():
    student = make()
    with pytest.raises(InputError, match="engram_dim"):
        student.set_table(torch.randn(40, 8))
    with pytest.raises(InputError, match="top_k"):
        student.set_table(torch.randn(3, 16))
    new = torch.randn(50, 16, dtype=torch.float64)
    student.set_table(new)
    assert student.table.dtype == torch.float32 and torch.equal(student.table, new.float())
    assert student(tokens()).traces == {}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 12), st.booleans(), st.data())
def test_trainable_parameters_count_a_built_students_adapters(heads, head_dim, engram_dim, router, data):
    """EngramConfig.trainable_parameters (what `ablate plan` uses) equals a built Student's trainable
    parameter count, over random widths, injection layers and router on/off."""
    hidden = heads * head_dim
    layers = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
    config = BackboneConfig(vocab_size=16, hidden_dim=hidden, num_layers=4, num_query_heads=1, num_kv_heads=1,
                            head_dim=2, ffn_dim=4, max_seq_len=4, layers_per_block=2)
    cfg = EngramConfig(inject_layers=tuple(layers), engram_dim=engram_dim, num_heads=heads, top_k=1, router=router)
    with torch.device("meta"):
        student = Student(Backbone(config), cfg, torch.empty(3, engram_dim))
    student.freeze_backbone()
    assert cfg.trainable_parameters(hidden) == trainable(student)
