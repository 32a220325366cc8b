"""A small real Student, its batches and sidecar, and float64 helpers shared by the probe tests."""

import math
from pathlib import Path
import torch
from ablate.model.logits import as_tensor
from ablate.api.components import CellView
from ablate.oracle.hashing import canonical_rows
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.student import EngramConfig, Student


V, D, ROWS, E_DIM, K = 40, 16, 64, 8, 4


LAYERS = (1, 3)


GATES = {1: 0.3, 3: -0.5}


LOG_ALPHA = math.log(0.17)


REL = 1e-5


SPECS = Path(__file__).resolve().parents[1] / "specs"


def make_table(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, E_DIM, generator=torch.Generator().manual_seed(seed))


def make_student(table: torch.Tensor, router: bool = True, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    backbone = Backbone(BackboneConfig(vocab_size=V, hidden_dim=D, num_layers=4, num_query_heads=2,
                                       num_kv_heads=1, head_dim=8, ffn_dim=24, max_seq_len=32,
                                       layers_per_block=2))
    student = Student(backbone, EngramConfig(inject_layers=LAYERS, engram_dim=E_DIM, num_heads=2, top_k=K,
                                             router=router), table)
    with torch.no_grad():
        for layer, g in GATES.items():
            student.engram_injections[str(layer)].gate.fill_(g)
        if router:
            student.engram_skip_router.W_align.weight.copy_(0.5 * torch.randn(D, D))
            student.engram_skip_router.log_alpha.fill_(LOG_ALPHA)
    return student


BATCHES = [torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


SIDECAR = torch.randn(ROWS, V, generator=torch.Generator().manual_seed(5))


def view(student, name="cell", evals=(), history=(), sidecar=SIDECAR) -> CellView:
    rows = [canonical_rows(b[:, :-1], ROWS, 42) for b in BATCHES]
    return CellView(name, {}, student, list(history), list(evals), BATCHES, rows, sidecar, torch.device("cpu"))


def outputs(student):
    """The model's own traced forwards (facts the probes read), one per probe batch, with the logits
    formed as [B, T, V] tensors."""
    with torch.no_grad():
        outs = [student.eval()(b[:, :-1], trace=True) for b in BATCHES]
    for out in outs:
        out.logits = as_tensor(out.logits)
        out.router_logits = None if out.router_logits is None else as_tensor(out.router_logits)
    return outs


def cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def close(got: float, want: float, rel: float = REL) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-9)

