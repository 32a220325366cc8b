"""Import the reference's backbones (zeb139-experiment.md §11.1–11.2) into ablate's Backbone.

Two upstream formats, detected from the file's bytes, never from its extension:

- `checkpoint.pt`: a torch.save zip pickle of {step, model_state_dict, optimizer_state_dict,
  config (a `ct87.model.HarmonyModelConfig` dataclass, absent in older checkpoints), rng_state,
  ...}. It is read by ablate.model.safe_pickle: nothing in it runs and `ct87` need not be
  installed; a pickle that asks to call anything (e.g. `os.system`) is refused.
- `model_step_N.safetensors` (safetensors.torch.save_model): upstream tensor names, no config;
  the tied head is stored once, as `embed_tokens.weight` or `lm_head.weight`.

Names map per §11.2 (`embed_tokens` → `embed`, `layers.i.ffn_norm` → `layers.i.mlp_norm`, the
`block_attnres.queries.j` [1, 1, d] stacked into `block_queries` [blocks − 1, d], the rest as is).
The legacy `engram_residual.*`, the adapters (`engram_injections.*`, `engram_skip_router.*`) and
any other `engram*` tensors are dropped from the backbone and listed: the student's adapters keep
their fresh initialisation, as in ZEB-139 (§1.3), unless a spec sets `[backbone] init_adapters =
true` — then the adapters, renamed by `map_adapters`, start from the checkpoint's. Everything
else must map onto the backbone exactly.

The architecture is never guessed: it comes from the pickled config, from `expected` (the spec),
or both, in which case the fields of CHECKED_FIELDS must agree.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ablate.errors import InputError
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import CONFIG_KEY, build_checked, save_backbone
from ablate.model.safe_pickle import Record, is_torch_zip, load_torch_zip

# reference config field → ablate BackboneConfig field; checked against the spec when both exist
CHECKED_FIELDS = {"num_layers": "num_layers", "hidden_dim": "hidden_dim",
                  "num_query_heads": "num_query_heads", "num_kv_heads": "num_kv_heads",
                  "head_dim": "head_dim", "ffn_dim": "ffn_dim", "vocab_size": "vocab_size",
                  "layers_per_block": "layers_per_block", "rope_theta": "rope_theta",
                  "rms_norm_eps": "norm_eps"}
# taken from the pickled config when no spec is given; never checked (RoPE tables are computed)
TAKEN_FIELDS = {**CHECKED_FIELDS, "max_seq_len": "max_seq_len"}
DROPPED = (("engram_residual.", "the reference's legacy gated-residual engram module (inert there)"),
           ("engram_injections.", "adapter weights: the student's injections start fresh (§1.3)"),
           ("engram_skip_router.", "adapter weights: the student's router starts fresh (§1.3)"),
           ("engram", "another engram module of the reference, ignored as ZEB-139 does"))
_XATTN = {"retrieval_query_proj": "W_r", "retrieval_norm": "row_norm", "q_proj": "W_q", "k_proj": "W_k",
          "v_proj": "W_v", "o_proj": "W_o", "q_norm": "q_norm", "k_norm": "k_norm"}
_INJECTION = re.compile(r"^engram_injections\.(\d+)\.(alpha|engram_xattn\.(\w+)\.(weight|bias))$")
_ROUTER = {"engram_skip_router.W_align.weight": "engram_skip_router.W_align.weight",
           "engram_skip_router.log_alpha": "engram_skip_router.log_alpha"}
ADAPTERS_FILE = "adapters.safetensors"  # the adapters of an imported checkpoint, beside its backbone
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_QUERY = re.compile(r"^block_attnres\.queries\.(\d+)$")


@dataclass
class ImportReport:
    source: str
    format: str
    step: int | None = None
    reference_config: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    mapped: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason → upstream names
    adapters: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # student name → tensor

    def to_info(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "step": self.step,
                "reference_config": self.reference_config, "mapped_tensors": self.mapped,
                "dropped_tensors": self.dropped}

    def lines(self) -> list[str]:
        step = f", step {self.step}" if self.step is not None else ""
        out = [f"{self.source} ({self.format}{step}): {self.mapped} backbone tensors mapped"
               + ("" if self.reference_config else "; no stored config, architecture from the spec")]
        out += [f"dropped {len(names)} ({why}): {', '.join(names)}" for why, names in self.dropped.items()]
        return out


_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pre-1.6 torch.save magic


def detect_format(path: Path) -> str:
    """"torch-pickle" (a torch.save zip), "reference-safetensors" (upstream names, none of ablate's)
    or "ablate" (anything else: ablate's safetensors reader judges it). InputError for a missing
    file or the legacy non-zip torch.save format."""
    if not path.is_file():
        raise InputError(f"Backbone checkpoint {str(path)!r} does not exist. Point the spec at an "
                         "existing file: ablate's .safetensors, or the reference's checkpoint.pt "
                         "or model_step_N.safetensors.")
    if is_torch_zip(path):
        return "torch-pickle"
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH))
        if head == _LEGACY_TORCH:
            raise InputError(f"Backbone checkpoint {str(path)!r} is a torch.save file in the legacy "
                             "(pre-PyTorch-1.6, non-zip) format, which ablate does not read. Re-save "
                             "it with a current PyTorch, or export its weights with safetensors.")
        n = struct.unpack("<Q", head[:8])[0] if len(head) > 8 else 0
        if head[8:9] == b"{" and 0 < n <= 100_000_000:
            f.seek(8)
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                header = None
            if isinstance(header, dict) and CONFIG_KEY not in (header.get("__metadata__") or {}):
                names = [k for k in header if k != "__metadata__"]
                if any(map(_is_reference_name, names)) and not any(map(_is_ablate_name, names)):
                    return "reference-safetensors"
    return "ablate"


def _is_reference_name(name: str) -> bool:
    return (name in ("embed_tokens.weight", "lm_head.weight") or ".ffn_norm." in name
            or name.startswith(("block_attnres.", "engram_residual.")))


def _is_ablate_name(name: str) -> bool:
    return (name in ("embed.weight", "block_queries") or ".mlp_norm." in name
            or name.startswith("backbone."))


def read_reference(path: Path, materialise: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, int | None, str]:
    """(upstream tensors, pickled config fields or None, step or None, format) of a reference file."""
    fmt = detect_format(path)
    if fmt == "reference-safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, None, None, fmt
    if fmt != "torch-pickle":
        raise InputError(f"{str(path)!r} is not a reference checkpoint (neither a torch.save zip "
                         "archive nor a safetensors file with the reference's tensor names). If it is "
                         "ablate's own backbone file, use it as it is; otherwise it is corrupt.")
    obj = load_torch_zip(path, materialise)
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state, config, step = obj["model_state_dict"], obj.get("config"), obj.get("step")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, config, step = obj, None, None  # a bare state dict saved with torch.save
    else:
        raise InputError(f"Checkpoint {str(path)!r} holds no model_state_dict (top level: "
                         f"{type(obj).__name__}). Point the spec at the reference's checkpoint.pt.")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"Checkpoint {str(path)!r}: model_state_dict is not a mapping of names to "
                         "tensors; the file is not a reference checkpoint.")
    if isinstance(config, Record):
        config = config.fields
    if config is not None and not isinstance(config, dict):
        raise InputError(f"Checkpoint {str(path)!r} has a config of type {type(config).__name__}, "
                         "not the reference's HarmonyModelConfig.")
    return dict(state), config, step if type(step) is int else None, fmt


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def resolve_config(path: Path, stored: dict[str, Any] | None, expected: dict[str, Any] | None,
                   vocab_rows: int | None) -> BackboneConfig:
    """The BackboneConfig: `expected` (spec) values first, else the pickled config's; every
    CHECKED_FIELDS field present in both must agree. vocab_size may also come from the embedding."""
    stored = stored or {}
    if stored.get("tie_embeddings") is False:
        raise InputError(f"Checkpoint {str(path)!r} was trained with an untied LM head; ablate's "
                         "backbone ties it to the embedding (reference §1.1). Use a tied checkpoint.")
    if stored.get("ffn_dim_overrides"):
        raise InputError(f"Checkpoint {str(path)!r} has per-layer ffn_dim_overrides "
                         f"{stored['ffn_dim_overrides']}; ablate's backbone has one ffn_dim.")
    ours = {ours: stored[ref] for ref, ours in TAKEN_FIELDS.items() if ref in stored}
    expected = dict(expected or {})
    if stored and expected:
        bad = [f"{ref}: checkpoint {stored[ref]!r}, {'corpus' if o == 'vocab_size' else 'spec'} {expected[o]!r}"
               for ref, o in CHECKED_FIELDS.items() if ref in stored and o in expected
               and stored[ref] != expected[o]]
        if bad:
            raise InputError(f"Checkpoint {str(path)!r} stores a config that does not match the "
                             f"spec's [backbone] or the corpus ({'; '.join(bad)}). Fix the spec's backbone "
                             "settings, or use a checkpoint of that architecture.")
    if not expected:
        lacking = [ref for ref in TAKEN_FIELDS if ref not in stored
                   and not (ref == "vocab_size" and vocab_rows is not None)]
        if lacking:
            what = (f"an incomplete architecture config (it lacks {lacking})" if stored else
                    "no architecture config (it predates config persistence)")
            raise InputError(f"Checkpoint {str(path)!r} stores {what} and none was given, so the "
                             "architecture would have to be guessed. Give the spec's [backbone] "
                             "settings (ablate convert-checkpoint SRC DST --spec SPEC).")
    merged = {**ours, **expected}
    if "vocab_size" not in merged and vocab_rows is not None:
        merged["vocab_size"] = vocab_rows
    try:
        return BackboneConfig.from_dict(merged)
    except TypeError as exc:
        raise InputError(f"Checkpoint {str(path)!r}: incomplete architecture ({exc}).") from exc


def map_names(path: Path, tensors: dict[str, torch.Tensor], config: BackboneConfig
              ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Upstream names → (backbone tensors, dropped {reason: names}, unmapped names). §11.2."""
    found: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    unmapped: list[str] = []
    queries: dict[int, torch.Tensor] = {}
    for name, t in sorted(tensors.items()):
        layer, query = _LAYER.match(name), _QUERY.match(name)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            continue
        elif layer and layer.group(2) == "ffn_norm.weight":
            found[f"layers.{layer.group(1)}.mlp_norm.weight"] = t
        elif layer or name == "final_norm.weight":
            found[name] = t
        elif query:
            queries[int(query.group(1))] = t
        elif name.startswith("engram"):
            why = next(why for prefix, why in DROPPED if name.startswith(prefix))
            dropped.setdefault(why, []).append(name)
        else:
            unmapped.append(name)
    embed, head = tensors.get("embed_tokens.weight"), tensors.get("lm_head.weight")
    if embed is not None and head is not None and not torch.equal(embed, head):
        raise InputError(f"Checkpoint {str(path)!r} has an lm_head.weight that differs from "
                         "embed_tokens.weight: an untied head, which ablate's backbone cannot hold.")
    if embed is not None or head is not None:
        found["embed.weight"] = embed if embed is not None else head
    if sorted(queries) != list(range(len(queries))):
        raise InputError(f"Checkpoint {str(path)!r} has block_attnres.queries {sorted(queries)}; "
                         "expected 0, 1, … without gaps.")
    if queries or config.num_blocks == 1:
        sizes = {q.numel() for q in queries.values()}
        if len(sizes) > 1:
            raise InputError(f"Checkpoint {str(path)!r}: block_attnres.queries differ in size {sizes}.")
        found["block_queries"] = (torch.stack([queries[j].reshape(-1) for j in sorted(queries)])
                                  if queries else torch.zeros(0, config.hidden_dim))
    return found, dropped, unmapped


def map_adapters(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's injection and router tensors (§11.2) under the student's names:
    engram_injections.{l}.alpha → engram_injections.{l}.gate, engram_xattn.{retrieval_query_proj,
    retrieval_norm, q/k/v/o_proj, q/k_norm} → xattn.{W_r, row_norm, W_q/W_k/W_v/W_o, q/k_norm};
    the router's W_align and log_alpha keep their names. Other tensors are not adapters."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _INJECTION.match(name)
        if m and m.group(2) == "alpha":
            out[f"engram_injections.{m.group(1)}.gate"] = t
        elif m and m.group(3) in _XATTN:
            out[f"engram_injections.{m.group(1)}.xattn.{_XATTN[m.group(3)]}.{m.group(4)}"] = t
        elif name in _ROUTER:
            out[_ROUTER[name]] = t
    return out


def import_reference(path: str | Path, expected: BackboneConfig | dict[str, Any] | None = None,
                     ) -> tuple[Backbone, ImportReport]:
    """A Backbone holding a reference checkpoint's weights, and what was mapped and dropped.

    expected: the spec's architecture (a BackboneConfig, or a dict of its fields, vocab_size
    optional). InputError on an unsafe pickle, a config mismatch, or any unaccounted tensor.
    """
    path = Path(path)
    tensors, stored, step, fmt = read_reference(path)
    if isinstance(expected, BackboneConfig):
        expected = expected.to_dict()
    embed = tensors.get("embed_tokens.weight", tensors.get("lm_head.weight"))
    config = resolve_config(path, stored, expected, embed.shape[0] if embed is not None else None)
    found, dropped, unmapped = map_names(path, tensors, config)
    if unmapped:
        raise InputError(f"Checkpoint {str(path)!r} has tensor(s) {unmapped} that map to no part "
                         "of ablate's backbone (reference §11.2). Use a checkpoint of the "
                         "reference's HarmonyModel, or report the names so the mapping can grow.")
    backbone = build_checked(path, config, found, [])
    report = ImportReport(str(path), {"torch-pickle": "torch.save checkpoint",
                                      "reference-safetensors": "reference safetensors"}[fmt], step,
                          {k: _plain(v) for k, v in stored.items()} if stored is not None else None,
                          config.to_dict(), len(found), dropped, map_adapters(tensors))
    return backbone, report


def check_reference(path: str | Path, architecture: dict[str, Any]) -> None:
    """Cheap preflight: a checkpoint.pt's pickle is safe to read and its stored config matches
    `architecture` (the spec's [backbone], vocabulary not yet known). No weights are read."""
    path = Path(path)
    if detect_format(path) == "torch-pickle":
        _, stored, _, _ = read_reference(path, materialise=False)
        if stored:
            resolve_config(path, stored, architecture, stored.get("vocab_size"))


def convert_checkpoint(src: str | Path, dst: str | Path,
                       expected: BackboneConfig | dict[str, Any] | None = None) -> ImportReport:
    """Import `src` (either reference format) and write it as ablate's safetensors at `dst`; the
    reference's adapter tensors, if any, go beside it as ADAPTERS_FILE (student names), used only
    when a spec sets [backbone] init_adapters = true."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"convert-checkpoint would overwrite its source {str(src)!r}; choose "
                         "another destination.")
    backbone, report = import_reference(src, expected)
    save_backbone(backbone, dst)
    if report.adapters:
        save_file({k: v.contiguous() for k, v in report.adapters.items()}, str(dst.with_name(ADAPTERS_FILE)))
    return report



def convert_command(args, console) -> int:
    """`ablate convert-checkpoint SRC DST [--spec SPEC ...]`."""
    expected = None
    if args.spec:
        from ablate.api.plugins import load_registry
        from ablate.config.spec import load_spec

        spec = load_spec(args.spec, args.overrides, args.profile, load_registry(args.plugins))
        expected = spec.backbone.architecture()
    report = convert_checkpoint(args.src, args.dst, expected)
    for line in report.lines():
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {args.dst} (ablate backbone safetensors)", highlight=False)
    return 0
