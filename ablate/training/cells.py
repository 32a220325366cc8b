"""One cell = one student (frozen backbone + engram injections [+ router]) trained with one
objective against one oracle variant. A cell writes only into its own directory:

    cells/<cell>/key.json            what determines it: its key and the content digests of the
                                     backbone and oracle it trains on (checked before reuse)
    cells/<cell>/state.safetensors   resumable state (weights, optimiser, RNG and data-stream
                                     states, step, metrics so far), rewritten atomically every
                                     checkpoint; removed once the cell is complete
    cells/<cell>/metrics.csv         the training log, read back by column name
    cells/<cell>/evals.json          validation losses by step
    cells/<cell>/checkpoint.safetensors   the trained (injection/router) weights
    cells/<cell>/DONE                checksums of the above, written last
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ablate.pipeline import store
from ablate.errors import InputError


@dataclass
class OracleVariant:
    """What a cell's student retrieves from and what its KL term targets, with the oracle's row
    contract. `copies` is shared by the variants of one oracle and holds the last sidecar sent to a
    device (variant.sidecar_on): consecutive cells of a variant, and the probes after them, read that
    one copy; the cache never keeps a second [N, V] tensor on the device alive."""

    table: torch.Tensor  # [N, E]
    sidecar: torch.Tensor  # [N, V] on the host
    contract: Any  # ablate.oracle.hashing.RowContract
    copies: dict = field(default_factory=dict, repr=False)

    def sidecar_on(self, device) -> torch.Tensor:
        """sidecar [N, V] on `device` (shuffled and gaussian share one sidecar, hence one copy)."""
        key = (id(self.sidecar), str(torch.device(device)))
        if key not in self.copies:
            self.copies.clear()
            self.copies[key] = self.sidecar.to(device)
        return self.copies[key]


def oracle_variants(oracle, spec) -> dict[str, OracleVariant]:
    """real; shuffled (ONE permutation applied to table and sidecar); gaussian (a content-free
    table with matched per-dimension mean/std, KL target shuffled)."""
    from ablate.oracle.build import gaussian_twin, shuffled

    # an imported oracle may bring its own twin (ablate.oracle.files); else ONE permutation from shuffle_seed
    shuf = oracle.shuffled_twin if oracle.shuffled_twin is not None else shuffled(oracle, spec.oracle.shuffle_seed)
    # upstream trains against the sidecar as saved, in bfloat16 (§11.3); ablate keeps float32
    sidecar_dtype = torch.bfloat16 if spec.numerics == "upstream" else torch.float32
    real_sidecar, shuf_sidecar = oracle.sidecar.to(sidecar_dtype), shuf.sidecar.to(sidecar_dtype)
    contract, copies = oracle.row_contract, {}
    return {
        "real": OracleVariant(oracle.table, real_sidecar, contract, copies),
        "shuffled": OracleVariant(shuf.table, shuf_sidecar, contract, copies),
        "gaussian": OracleVariant(gaussian_twin(oracle.table, spec.oracle.gaussian_seed), shuf_sidecar, contract, copies),
    }


def engram_config(spec, cell):
    from ablate.model.student import EngramConfig

    m = spec.model
    return EngramConfig(inject_layers=tuple(m.inject_layers), engram_dim=spec.oracle.engram_dim, num_heads=m.num_heads,
                        top_k=m.top_k, retrieval_bias=m.retrieval_bias, gate_init=m.gate_init, router=cell.router,
                        alpha_init=m.alpha_init, numerics=spec.numerics, similarity=m.similarity)


def train_config(spec, cell, contract):
    """[train] resolved for one cell; contract: the oracle's row contract (OracleVariant.contract)."""
    from ablate.training.train import TrainConfig

    return TrainConfig(**spec.train.model_dump(exclude={"compile", "data_seed", "fuse"}), name=cell.name,
                       data_seed=training_seeds(spec, cell)[1], row_contract=contract, compile=compile_cells(spec),
                       numerics=spec.numerics)


def training_seeds(spec, cell) -> tuple[int, int]:
    """(model_seed, data_seed) of a cell: train.model_seed and train.data_seed offset by the cell's
    seed (`[sweep] seed`; seed 0 and no seed both train exactly as the spec says). The validation
    windows (train.val_seed) and the probe batches are the same for every seed, so seeds compare paired."""
    offset = cell.seed or 0
    return spec.train.model_seed + offset, spec.train.data_seed + offset


def fuses(spec, device: torch.device | str) -> bool:
    """train.fuse resolved for a run on `device`: whether cells that share their training windows
    (same data seed, `training_seeds`) train as fused groups (ablate.training.fused). Never without
    an injection layer; "on": always; "auto": on CUDA when the cells compile, under numerics
    "ablate" (a compiled group step is 1.1× the cells one by one on an H200; eager, a group would
    hold every member's eager intermediates at once, and under "upstream" every member's whole
    [B·T, V] logits: 28 GiB for zeb139's six cells, for little gain)."""
    from ablate.training import fastpath

    if not spec.model.inject_layers or spec.train.fuse == "off":
        return False
    return spec.train.fuse == "on" or (spec.numerics == "ablate" and compile_cells(spec)
                                       and fastpath.enabled_for(device))


COMPILE_MIN_STEPS = 3000  # H100: compiling costs ~135 s cold and saves ~35 ms per step (docs/performance.md)


def compile_cells(spec) -> bool:
    """train.compile resolved: "auto" compiles when all cells together train ≥ COMPILE_MIN_STEPS steps."""
    mode = spec.train.compile
    return mode == "on" or (mode == "auto" and spec.train.steps * len(spec.cells) >= COMPILE_MIN_STEPS)


def build_student(spec, cell, backbone_path: Path, vocab_size: int, table: torch.Tensor, device):
    """A fresh student: the frozen backbone from its checkpoint plus newly initialised adapters."""
    from ablate.model.backbone import Backbone
    from ablate.model.checkpoint import load_backbone
    from ablate.model.student import Student
    from ablate.pipeline.stages import backbone_config

    config = backbone_config(spec, vocab_size)
    backbone = load_backbone(backbone_path, expected=config)
    torch.manual_seed(training_seeds(spec, cell)[0])
    if spec.numerics == "upstream":  # the reference seeds once, then builds the whole model: the
        weights = backbone.state_dict()  # backbone's init draws come before the adapters' (§11.4)
        backbone = Backbone(config)
        backbone.load_state_dict(weights)
        backbone.use_float32_rope()
    student = Student(backbone, engram_config(spec, cell), table)
    if spec.backbone.init_adapters:
        from ablate.model.reference_import import ADAPTERS_FILE

        load_adapters(student, Path(backbone_path).with_name(ADAPTERS_FILE), spec.backbone.checkpoint)
    student.freeze_backbone()
    return student.to(device)


def load_adapters(student, path: Path, source: str) -> None:
    """Initialise every adapter parameter of `student` from `path` (student names; tensors of
    adapters this cell lacks, e.g. the router of a router-off cell, are not used). InputError
    unless each parameter is there with its shape."""
    if not path.is_file():
        raise InputError(f"[backbone] init_adapters = true, but the checkpoint {source!r} carries no adapter "
                         "tensors (engram_injections.*, engram_skip_router.*). Use a reference checkpoint of a "
                         "trained cell, or drop init_adapters so the adapters start fresh.")
    saved = load_file(str(path))
    params = {n: p for n, p in student.named_parameters() if n.startswith(("engram_injections.", "engram_skip_router."))}
    missing = sorted(n for n in params if n not in saved or saved[n].shape != params[n].shape)
    if missing:
        shapes = {n: tuple(saved[n].shape) if n in saved else None for n in missing[:4]}
        raise InputError(f"[backbone] init_adapters = true, but {source!r} lacks or mis-shapes adapter tensors "
                         f"{shapes} (checkpoint → shape; None = absent): its injection layers or engram_dim differ "
                         "from [model]/[oracle]. Match them to the checkpoint's, or drop init_adapters.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


# Train settings that change when state is saved, never what is computed: left out of the key.
_KEY_EXEMPT_TRAIN = {"checkpoint_every", "compile", "fuse"}  # compile, fuse: same math, bf16-rounding-level differences
STATE_FILE = "state.safetensors"


def cell_key(spec, cell, inputs: dict[str, str], objective_cls) -> str:
    """inputs: the keys of the backbone and oracle stages; the objective's code is part of the key."""
    from ablate.pipeline.stages import component_stage_key

    # a cell without a seed is keyed as before the field existed, so its cached results stay valid;
    # base and sweep are what the name already says
    cell_config = cell.model_dump(mode="json", exclude={"base", "sweep"} | ({"seed"} if cell.seed is None else set()))
    config = {"cell": cell_config, "train": spec.train.model_dump(exclude=_KEY_EXEMPT_TRAIN),
              "model": spec.model.model_dump()}
    if spec.numerics != "ablate":  # only then: keys of cells trained before the field existed stay valid
        config["numerics"] = spec.numerics
    if spec.backbone.init_adapters:
        config["init_adapters"] = True
    if cell.oracle != "real":  # a control variant is drawn from the oracle with these seeds (oracle_variants)
        config["control_seeds"] = [spec.oracle.shuffle_seed, spec.oracle.gaussian_seed]
    return component_stage_key("cell", config, inputs, (objective_cls,))


def identity(key: str, input_digests: dict[str, str | None]) -> dict:
    """What a cell directory must record to be reused: its key and its inputs' content digests."""
    return {"key": key, "inputs": dict(input_digests)}


def recorded_identity(cell_dir: Path) -> dict | None:
    try:
        recorded = store.read_json(cell_dir / "key.json")
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def is_complete(cell_dir: Path, ident: dict) -> bool:
    return recorded_identity(cell_dir) == ident and store.is_done(cell_dir)


def prepare_dir(cell_dir: Path, ident: dict, warn) -> dict | None:
    """Keep an interrupted cell's resumable state if it belongs to the same identity; else start
    clean. Returns the resume state, or None (warn(message) when a state had to be dropped)."""
    if recorded_identity(cell_dir) != ident and cell_dir.exists():
        store.remove_tree(cell_dir, cell_dir.parent)
    cell_dir.mkdir(parents=True, exist_ok=True)
    store.remove_temps(cell_dir)  # half-written files of a killed run
    store.write_json(cell_dir / "key.json", ident)
    (cell_dir / store.MARKER).unlink(missing_ok=True)  # a corrupt finished cell is recomputed
    state_file = cell_dir / STATE_FILE
    if not state_file.is_file():
        return None
    try:
        state = store.load_tree(state_file)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise InputError(f"{state_file} holds no training step")
        return state
    except InputError as exc:
        warn(f"the resume state of {cell_dir.name} is unusable ({exc}); that cell restarts from step 0")
        state_file.unlink()
        return None


def state_mismatch(state: dict, student) -> str | None:
    """Why a resume state cannot belong to this student (names, shapes, dtypes), or None."""
    saved = state.get("student")
    params = dict(student.trainable_named_parameters())
    if not isinstance(saved, dict) or set(saved) != set(params):
        return "its parameter names differ from this student's"
    for name, p in params.items():
        t = saved[name]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
            return f"parameter {name} is {getattr(t, 'shape', '?')} {getattr(t, 'dtype', '?')}, expected {tuple(p.shape)} {p.dtype}"
    return None


def save_state(cell_dir: Path, state: dict) -> None:
    store.save_tree(cell_dir / STATE_FILE, state)


def write_outputs(cell_dir: Path, student, outcome, meta: dict[str, Any]) -> None:
    """Write the cell's final files, the completion marker last, then drop the resume state."""
    weights = {k: v.detach().cpu().contiguous() for k, v in student.trainable_named_parameters()}
    save_file(weights, str(cell_dir / ".checkpoint.safetensors.tmp"))
    (cell_dir / ".checkpoint.safetensors.tmp").replace(cell_dir / "checkpoint.safetensors")
    store.write_atomic(cell_dir / "metrics.csv", history_csv(outcome.history))
    store.write_json(cell_dir / "evals.json", outcome.evals)
    store.write_json(cell_dir / "outcome.json", {"final_val_loss": outcome.final_val_loss, "steps": outcome.steps_done,
                                                 "seconds": outcome.seconds, "tokens_per_s": outcome.tokens_per_s, "tokens": outcome.tokens,
                                                 "compiled": outcome.compiled, **meta})
    store.mark_done(cell_dir, exclude=(STATE_FILE,))
    (cell_dir / STATE_FILE).unlink(missing_ok=True)


def history_csv(rows: list[dict[str, float]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_history(path: Path) -> list[dict[str, float]]:
    """Read metrics.csv back by column name; empty cells are absent keys."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def load_trained(spec, cell, cell_dir: Path, backbone_path: Path, vocab_size: int, table, device):
    student = build_student(spec, cell, backbone_path, vocab_size, table, device)
    path = cell_dir / "checkpoint.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise InputError(f"Cell checkpoint {path} is unreadable ({exc}); delete {cell_dir} to retrain that cell.") from exc
    params = dict(student.trainable_named_parameters())
    missing = sorted(set(params) - set(weights))
    if missing:
        raise InputError(f"Cell checkpoint {path} lacks {missing[:3]}…; delete {cell_dir} to retrain that cell.")
    for name, p in params.items():
        store.check_tensor(weights[name], name, tuple(p.shape), p.dtype, path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device))
    return student.eval()


