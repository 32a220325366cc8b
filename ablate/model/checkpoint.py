"""Backbone checkpoints: safetensors weights plus the BackboneConfig in the file's metadata.

Loading is strict (zeb139-experiment.md §9.4): the architecture is never guessed, every backbone
tensor must be in the file, and any other key must match an explicitly ignored prefix. The
reference's own checkpoints (checkpoint.pt, model_step_N.safetensors) are imported by
ablate.model.reference_import, which this module dispatches to when it detects one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ablate.errors import InputError
from ablate.model.backbone import Backbone, BackboneConfig

CONFIG_KEY = "ablate.backbone_config"
STUDENT_PREFIX = "backbone."


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> None:
    """Write the backbone's weights and config to `path` (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(backbone.config.to_dict())})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; InputError when it is unreadable."""
    if not path.is_file():
        raise InputError(f"Backbone checkpoint {str(path)!r} does not exist. Point the spec's "
                         "backbone checkpoint at an existing .safetensors file, or run the "
                         "pretrain stage to produce one.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"Backbone checkpoint {str(path)!r} is not a readable safetensors file "
                         f"({exc}); it is corrupt or truncated. Re-create it (e.g. rerun "
                         "pretrain) or point the spec at an intact checkpoint.") from exc
    return tensors, metadata


def _stored_config(path: Path, metadata: dict[str, str]) -> BackboneConfig | None:
    if CONFIG_KEY not in metadata:
        return None
    try:
        stored = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise InputError(f"Backbone checkpoint {str(path)!r} has unreadable config metadata "
                         f"({exc}); re-create the checkpoint.") from exc
    if not isinstance(stored, dict):
        raise InputError(f"Backbone checkpoint {str(path)!r} has config metadata that is not "
                         "a JSON object; re-create the checkpoint.")
    try:
        return BackboneConfig.from_dict(stored)
    except (InputError, TypeError) as exc:
        raise InputError(f"Backbone checkpoint {str(path)!r} stores an invalid config ({exc}); "
                         "re-create the checkpoint with this version of ablate.") from exc


def _resolve_config(path: Path, stored: BackboneConfig | None,
                    expected: BackboneConfig | None) -> BackboneConfig:
    if stored is None and expected is None:
        raise InputError(f"Backbone checkpoint {str(path)!r} stores no architecture config and "
                         "none was given, so its architecture would have to be guessed. Pass "
                         "the expected BackboneConfig (the spec's backbone settings), or re-save "
                         "the checkpoint with ablate.")
    if stored is not None and expected is not None:
        mismatches = [f"{k}: checkpoint has {v!r}, expected {expected.to_dict()[k]!r}"
                      for k, v in stored.to_dict().items() if expected.to_dict()[k] != v]
        if mismatches:
            raise InputError(f"Backbone checkpoint {str(path)!r} does not match the expected "
                             f"config ({'; '.join(mismatches)}). Fix the spec's backbone "
                             "settings or use a checkpoint of that architecture.")
    return stored if stored is not None else expected


def _backbone_keys(path: Path, tensors: dict[str, torch.Tensor],
                   ignore_unexpected_prefixes: tuple[str, ...],
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map file keys (bare or prefixed "backbone.") to backbone keys → (found, unexpected)."""
    prefixed = any(k.startswith(STUDENT_PREFIX) for k in tensors)
    found: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in tensors.items():
        if prefixed and key.startswith(STUDENT_PREFIX):
            name = key[len(STUDENT_PREFIX):]
        elif key.startswith(ignore_unexpected_prefixes):
            continue
        elif prefixed:
            unexpected.append(key)
            continue
        else:
            name = key
        if name in found:
            raise InputError(f"Backbone checkpoint {str(path)!r} holds tensor {name!r} twice "
                             "(bare and prefixed 'backbone.'); re-create the checkpoint.")
        found[name] = value
    return found, unexpected


def checkpoint_format(path: str | os.PathLike) -> str:
    """"ablate" (this module's safetensors, or any file with the backbone's tensor names), or the
    reference's "torch-pickle" (checkpoint.pt) / "reference-safetensors" (model_step_N.safetensors),
    detected from the file's bytes and tensor names (see ablate.model.reference_import)."""
    from ablate.model.reference_import import detect_format

    return detect_format(Path(path))


def load_backbone(path: str | os.PathLike, expected: BackboneConfig | None = None,
                  allow_missing_prefixes: Iterable[str] = ("engram_injections.",
                                                           "engram_skip_router."),
                  ignore_unexpected_prefixes: Iterable[str] = ("engram_injections.",
                                                               "engram_skip_router.",
                                                               "engram.")) -> Backbone:
    """Load a backbone from `path`, checking every tensor.

    The file's keys may be bare backbone keys or prefixed "backbone." (a Student state dict).
    Keys starting with an `ignore_unexpected_prefixes` entry are skipped; any other unknown key,
    any missing backbone tensor not covered by `allow_missing_prefixes` (the defaults name only
    student-side modules, so every backbone tensor must load), any shape mismatch, and any
    difference between the stored config and `expected` raise InputError. A reference checkpoint
    (checkpoint.pt or model_step_N.safetensors) is imported instead: reference_import.
    """
    path = Path(path)
    if path.is_file() and checkpoint_format(path) != "ablate":
        from ablate.model.reference_import import import_reference

        return import_reference(path, expected)[0]
    tensors, metadata = _read(path)
    config = _resolve_config(path, _stored_config(path, metadata), expected)
    found, unexpected = _backbone_keys(path, tensors, tuple(ignore_unexpected_prefixes))
    return build_checked(path, config, found, unexpected, tuple(allow_missing_prefixes))


def build_checked(path: Path, config: BackboneConfig, found: dict[str, torch.Tensor],
                  unexpected: list[str], allow_missing_prefixes: tuple[str, ...] = ()) -> Backbone:
    """A Backbone(config) holding `found` (backbone names → tensors), with strict accounting:
    unexpected or missing tensors and shape mismatches raise InputError naming `path`."""
    with torch.random.fork_rng(devices=[]):  # building must not disturb the caller's RNG
        backbone = Backbone(config)
    own = backbone.state_dict()
    unexpected = unexpected + [k for k in found if k not in own]
    if unexpected:
        raise InputError(f"Backbone checkpoint {str(path)!r} has unexpected tensor(s) "
                         f"{sorted(unexpected)}: they belong to no backbone of this config. Use "
                         "a checkpoint of this architecture, or add their prefix to "
                         "ignore_unexpected_prefixes if they are known extras.")
    missing = [k for k in own if k not in found and not k.startswith(allow_missing_prefixes)]
    if missing:
        raise InputError(f"Backbone checkpoint {str(path)!r} lacks backbone tensor(s) "
                         f"{sorted(missing)}; loading it would leave them randomly initialised. "
                         "Use a complete checkpoint of this architecture.")
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in found.items() if v.shape != own[k].shape]
    if wrong:
        raise InputError(f"Backbone checkpoint {str(path)!r} has tensors of the wrong shape "
                         f"({'; '.join(wrong)}). The checkpoint was trained with a different "
                         "architecture; fix the spec's backbone settings or the checkpoint.")
    backbone.load_state_dict(found, strict=False)
    return backbone
