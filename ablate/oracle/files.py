"""An oracle from files: import the reference's oracle (reference §4.4, §11.3) instead of running
the teacher pass, with `[oracle] source = "files"`.

    table             <stem>.safetensors                  engram.weight [rows, E] float32
    sidecar           <stem>_teacher_logits.safetensors   teacher_logits.weight [rows, V] bfloat16 (or float32)
    stats (optional)  <stem>.safetensors.stats.json       teacher, layer, total_entries, engram_dim, hash_seeds,
                                                          populated_rows, populated_fraction,
                                                          pca_explained_variance_ratio_total, teacher_logits_sidecar
    shuffled twin (optional): the same two files with `_shuffled_seed0` before the extension

A row is populated iff its table row is non-zero, and the sidecar must populate the same rows.
Everything is checked before any cell trains; each problem is an InputError naming the file and
the fix. What is imported:
- the sidecar is upcast to float32 (exact; numerics = "upstream" rounds it back to the same bf16
  values in the cells), and the stats say which dtype the file held;
- counts = the populated mask as 0/1: the files carry no per-row update counts (ablate uses counts
  only to carry the mask through a shuffle and into its artifact);
- a given shuffled twin must be ONE row permutation π of the real oracle applied to table and
  sidecar alike (§4.5); it is used as the shuffled control, and the stats record whether π is the
  one ablate draws from `shuffle_seed` (randperm(rows), CPU generator seeded shuffle_seed).
  Without a twin the control is built from shuffle_seed as for a computed oracle.
The stage key hashes the files' bytes (sha256), so a cached import is reused while the files stay
the same, wherever they are moved.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from ablate.pipeline import store
from ablate.errors import InputError
from ablate.oracle.build import SIDECAR_KEY, TABLE_KEY, Oracle, _pairwise_abs_cos

ROLES = {"table": TABLE_KEY, "sidecar": SIDECAR_KEY, "shuffled_table": TABLE_KEY, "shuffled_sidecar": SIDECAR_KEY}
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}  # safetensors dtype names
CHUNK = 1024  # rows per piece when scanning a sidecar (bounds the [CHUNK, V] temporaries)


def paths(o) -> dict[str, Path]:
    """role → path of every file `o` ([oracle] spec) names; stats defaults to the reference's
    `<table>.stats.json` beside the table when that file exists."""
    out = {role: Path(p) for role, p in o.files().items()}
    default = Path(f"{o.table}.stats.json")
    if "stats" not in out and default.is_file():
        out["stats"] = default
    return out


def digests(o) -> dict[str, str]:
    """role → sha256 of the file's bytes (missing files fail with the fix)."""
    found = paths(o)
    for role, path in found.items():
        if not path.is_file():
            raise InputError(f"[oracle] {role} = {str(path)!r} does not exist. Fix the path (relative paths are read "
                             f"from the directory you run ablate in), or use source = \"teacher\" to compute the oracle.")
    return {role: store.file_digest(path) for role, path in found.items()}


def _header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares, {name: {"dtype", "shape", ...}}, from its header only."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > path.stat().st_size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}). Point [oracle] at the reference's "
                         f"oracle files (reference §11.3).") from exc
    return {k: v for k, v in header.items() if k != "__metadata__"}


def check_headers(o, vocab: int | None) -> None:
    """Tensor names, dtypes and shapes of every safetensors file against the spec's rows and
    engram_dim and the corpus's vocabulary `vocab` (None = not known yet): headers only, cheap."""
    for role, path in paths(o).items():
        if role == "stats":
            continue
        name = ROLES[role]
        tensors = _header(path)
        if name not in tensors:
            raise InputError(f"[oracle] {role} {path} holds no tensor {name!r} (it holds {sorted(tensors)}); the "
                             f"reference writes {TABLE_KEY!r} into <stem>.safetensors and {SIDECAR_KEY!r} into "
                             f"<stem>_teacher_logits.safetensors. Point {role} at the right file.")
        dtype, shape = tensors[name].get("dtype"), list(tensors[name].get("shape", []))
        allowed = ("F32",) if name == TABLE_KEY else ("BF16", "F32")
        if dtype not in allowed:
            raise InputError(f"[oracle] {role} {path}: {name} is {dtype}, expected {' or '.join(allowed)} "
                             f"(reference §11.3). Re-export it in that dtype.")
        width, what = (o.engram_dim, "[oracle] engram_dim") if name == TABLE_KEY else (vocab, "the corpus's vocabulary")
        if len(shape) != 2 or shape[0] != o.rows or (width is not None and shape[1] != width):
            fix = ("It must be a 2-D tensor; re-export it" if len(shape) != 2 else
                   f"Set [oracle] rows = {shape[0]} to match the files" if shape[0] != o.rows else
                   f"Set [oracle] engram_dim = {shape[1]} to match the files" if name == TABLE_KEY else
                   f"The sidecar predicts {shape[1]} tokens: use the corpus (tokenizer) the oracle was computed on")
            raise InputError(f"[oracle] {role} {path}: {name} is {shape}, expected [{o.rows}, {width}] ([oracle] rows, "
                             f"{what}). {fix}.")


def _read(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except Exception as exc:  # safetensors raises assorted types on damaged files
        raise InputError(f"{path}: tensor {name!r} cannot be read ({exc}). The file is damaged; copy it again.") from exc


def _scan(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(row populated [rows] bool, all finite) of x [rows, D], in pieces of CHUNK rows."""
    populated, finite = [], True
    for piece in x.split(CHUNK):
        populated.append((piece != 0).any(dim=1))
        finite = finite and bool(torch.isfinite(piece).all())
    return torch.cat(populated), finite


def _load_pair(table_path: Path, sidecar_path: Path, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(table [rows, E] float32, sidecar [rows, V] float32, populated [rows] bool, the sidecar
    file's dtype name); non-finite values or unequal populated masks → InputError."""
    table, raw = _read(table_path, TABLE_KEY), _read(sidecar_path, SIDECAR_KEY)
    populated, table_finite = _scan(table)
    side_populated, side_finite = _scan(raw)
    for ok, path in ((table_finite, table_path), (side_finite, sidecar_path)):
        if not ok:
            raise InputError(f"{what} {path} holds NaN or infinite values; re-export it from a finished oracle pass.")
    if not torch.equal(populated, side_populated):
        differ = (populated != side_populated).nonzero().squeeze(1)
        raise InputError(f"{what}: the table {table_path} populates {int(populated.sum())} rows and the sidecar "
                         f"{sidecar_path} {int(side_populated.sum())}; they disagree on {differ.numel()} row(s), first "
                         f"row {int(differ[0])} (a row is populated iff it is non-zero, reference §11.3). The two files "
                         f"come from different oracle passes: use the pair written together.")
    if not populated.any():
        raise InputError(f"{what} {table_path} populates no row (every row is zero). Use a finished oracle.")
    dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[raw.dtype]
    return table, raw.to(torch.float32), populated, dtype


def _check_stats(stats: Any, path: Path, o, table: torch.Tensor, populated: torch.Tensor) -> dict[str, Any]:
    """The reference's stats.json against the files and the spec; returns it."""
    if not isinstance(stats, dict):
        raise InputError(f"[oracle] stats {path} is not a JSON object; point stats at the <table>.stats.json the "
                         f"reference wrote, or leave it unset.")
    n = int(populated.sum())
    want = {"engram_dim": (table.shape[1], "the table's width"), "populated_rows": (n, "the table's non-zero rows"),
            "hash_seeds": (list(o.seeds), "[oracle] seeds")}
    for field, (value, what) in want.items():
        if field in stats and stats[field] != value:
            fix = (f"Set [oracle] seeds = {stats[field]}: the student must hash n-grams as the oracle did"
                   if field == "hash_seeds" else "The stats belong to other files: point stats at the table's own")
            raise InputError(f"[oracle] stats {path}: {field} = {stats[field]!r} but {what} is {value!r}. {fix}.")
    fraction = stats.get("populated_fraction")
    if isinstance(fraction, (int, float)) and not math.isclose(fraction, n / o.rows, abs_tol=1e-6):
        raise InputError(f"[oracle] stats {path}: populated_fraction = {fraction} but the table populates {n} of "
                         f"{o.rows} rows ({n / o.rows}). The stats belong to other files: point stats at the table's own.")
    return stats


def _twin(o, table, sidecar, found) -> tuple[Oracle, dict[str, Any]]:
    """The given shuffled twin, checked to be one row permutation of (table, sidecar)."""
    t_path, s_path = found["shuffled_table"], found["shuffled_sidecar"]
    twin_table, twin_sidecar, twin_populated, _ = _load_pair(t_path, s_path, "[oracle] shuffled twin")
    perm = torch.randperm(o.rows, generator=torch.Generator().manual_seed(o.shuffle_seed))
    seeded = torch.equal(twin_table, table[perm]) and torch.equal(twin_sidecar, sidecar[perm])
    if not seeded:  # some other permutation? match rows by their table bytes, then check the sidecar
        rows: dict[bytes, list[int]] = {}
        for i, row in enumerate(table.numpy()):
            rows.setdefault(row.tobytes(), []).append(i)
        try:
            perm = torch.tensor([rows[row.tobytes()].pop() for row in twin_table.numpy()])
        except (KeyError, IndexError):
            perm = None
        if perm is None or not torch.equal(twin_sidecar, sidecar[perm]):
            raise InputError(f"[oracle] shuffled twin {t_path} and {s_path} is not one row permutation of the real "
                             f"oracle's table and sidecar (reference §4.5: shuffled[i] = original[π[i]], the same π on "
                             f"both). Use the _shuffled_seed0 files written with this oracle, or leave shuffled_table "
                             f"and shuffled_sidecar unset to build the twin from shuffle_seed.")
    record = {"given": True, "matches_shuffle_seed": seeded, "shuffle_seed": o.shuffle_seed,
              "rows_moved": int((perm != torch.arange(o.rows)).sum())}
    twin = Oracle(table=twin_table, sidecar=twin_sidecar, populated=twin_populated, counts=twin_populated.long(),
                  stats={"origin": "files", "shuffled_twin": record})
    return twin, record


def import_oracle(o, vocab: int) -> Oracle:
    """The oracle the files of `o` ([oracle] spec, source = "files") hold, fully checked against
    the spec and the corpus vocabulary `vocab`: table [rows, E] float32, sidecar [rows, V]
    float32, populated [rows] bool, counts [rows] int64 (0/1), stats, and the given shuffled twin."""
    found = paths(o)
    hashes = digests(o)
    check_headers(o, vocab)
    table, sidecar, populated, sidecar_dtype = _load_pair(found["table"], found["sidecar"], "[oracle]")
    imported_stats = None
    if "stats" in found:
        try:
            imported_stats = json.loads(found["stats"].read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"[oracle] stats {found['stats']} cannot be read as JSON ({exc}). Point stats at the "
                             f"reference's <table>.stats.json, or leave it unset.") from exc
        _check_stats(imported_stats, found["stats"], o, table, populated)
    n = int(populated.sum())
    stats: dict[str, Any] = {
        "origin": "files", "rows": o.rows, "engram_dim": o.engram_dim, "hash_seeds": list(o.seeds),
        "orders": list(o.orders), "row_contract": {"rows": o.rows, "seed": o.seeds[0]},
        "populated_rows": n, "populated_fraction": n / o.rows,
        "pairwise_abs_cos": _pairwise_abs_cos(table, populated, o.cos_sample, 0),
        "imported": {"files": {role: {"path": str(found[role]), "sha256": hashes[role]} for role in found},
                     "sidecar_dtype": sidecar_dtype, "stats": imported_stats,
                     "counts": "the populated mask as 0/1 (the files carry no per-row update counts)"},
    }
    twin = None
    if "shuffled_table" in found:
        twin, stats["shuffled_twin"] = _twin(o, table, sidecar, found)
    else:
        stats["shuffled_twin"] = {"given": False, "shuffle_seed": o.shuffle_seed}
    return Oracle(table=table, sidecar=sidecar, populated=populated, counts=populated.long(), stats=stats,
                  shuffled_twin=twin)
