"""Built-in corpora: the embedded synthetic stream, text folders, pre-tokenised shards and
Hugging Face datasets saved with `save_to_disk`.

Every corpus returns documents joined by EOS as one int64 stream; validation is the last
`val_fraction` of that stream (moved forward to a document boundary when one is near), as in
the reference's tail split.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ablate.api import Corpus, InputError, Params, Progress, TokenCorpus, hookimpl, no_progress
from ablate_builtins import gguf, synthetic

# ----------------------------------------------------------------------------------- helpers


def split_tail(stream: np.ndarray, val_fraction: float, eos_id: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """stream [N] → (train, val): val = the last ⌈N·val_fraction⌉ tokens, with the cut moved
    forward to just after an EOS when one lies within the first half of that tail."""
    n = stream.size
    n_val = max(1, int(round(n * val_fraction)))
    cut = n - n_val
    eos_after = np.flatnonzero(stream[cut: cut + n_val // 2] == eos_id)
    if eos_after.size:
        cut += int(eos_after[0]) + 1
    if cut < 2 or n - cut < 2:
        raise InputError(f"{what} has {n} tokens, too few to split into train and validation with "
                         f"val_fraction={val_fraction}: each part needs at least 2 tokens. Add data "
                         f"or change val_fraction.")
    return stream[:cut], stream[cut:]


def split_chunks(stream: np.ndarray, val_fraction: float, chunk: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """stream [N] → (train, val) as the reference splits (§4.1, §11.4): the stream cut into
    ⌊N/chunk⌋ non-overlapping chunks (a shorter tail dropped), the last ⌊val_fraction·chunks⌋
    chunks are validation, the rest train."""
    n_chunks = stream.size // chunk
    n_val = math.floor(val_fraction * n_chunks)
    if n_val < 1 or n_chunks - n_val < 1:
        raise InputError(f"{what} has {stream.size} tokens = {n_chunks} chunks of {chunk}: too few for a chunk-aligned "
                         f"split with val_fraction={val_fraction} (it needs ⌊val_fraction·chunks⌋ ≥ 1 and a train "
                         f"chunk). Add data, raise val_fraction, lower val_chunk, or use val_split = \"tail\".")
    cut = (n_chunks - n_val) * chunk
    return stream[:cut], stream[cut:n_chunks * chunk]


class SplitParams(Params):
    """How a single stream becomes train and validation (text and token-file corpora)."""

    val_fraction: float = Field(0.01, ge=0.001, le=0.5)
    val_split: Literal["tail", "chunks"] = Field(
        "tail", description='"tail": the last val_fraction of tokens, moved to a document boundary; "chunks": the '
                            "last ⌊val_fraction·chunks⌋ of val_chunk-token chunks (the reference's; the default "
                            'under numerics = "upstream")')
    val_chunk: int = Field(2048, ge=2, description='chunk length of val_split = "chunks"')

    def split_stream(self, stream: np.ndarray, eos_id: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.val_split == "chunks":
            return split_chunks(stream, self.val_fraction, self.val_chunk, what)
        return split_tail(stream, self.val_fraction, eos_id, what)


def _token_corpus(train: np.ndarray, val: np.ndarray, vocab_size: int, eos_id: int,
                  tokenizer_path: Path | None, info: dict[str, Any]) -> TokenCorpus:
    info = {**info, "n_train": int(train.size), "n_val": int(val.size), "vocab_size": vocab_size, "eos_id": eos_id}
    return TokenCorpus(train=torch.from_numpy(np.ascontiguousarray(train, dtype=np.int64)),
                       val=torch.from_numpy(np.ascontiguousarray(val, dtype=np.int64)),
                       vocab_size=vocab_size, eos_id=eos_id, tokenizer_path=tokenizer_path, info=info)


# --------------------------------------------------------------------------------- synthetic


def _unigram_entropy(stream: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the empirical token frequencies of stream [N]: what a model that
    learns only frequencies approaches."""
    freq = np.bincount(stream, minlength=vocab_size) / stream.size
    freq = freq[freq > 0]
    return float(-(freq * np.log(freq)).sum())


class SyntheticParams(Params):
    vocab_size: int = Field(512, ge=3, description="V; id 0 is EOS")
    n_tokens: int = Field(400_000, ge=1_000, description="length of the whole stream")
    val_fraction: float = Field(0.05, ge=0.01, le=0.5)
    seed: int = Field(0, ge=0)
    doc_len: float = Field(200.0, ge=1.0, description="mean document length (geometric)")
    zipf_a: float = Field(1.1, ge=0.0, description="Zipf exponent of the background unigram law (0 = uniform)")
    planted_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of bigram contexts that are rules")
    determinism: float = Field(0.9, ge=0.0, le=1.0, description="P(rule target | rule context)")
    structure: Literal["planted", "none"] = "planted"


class SyntheticCorpus(Corpus):
    name = "synthetic"
    Params = SyntheticParams
    description = ("Embedded seeded token stream (no download): Zipf background plus planted "
                   "bigram-context rules; see ablate_builtins.synthetic for the exact generator.")

    def spec(self) -> synthetic.SyntheticSpec:
        p = self.params
        return synthetic.SyntheticSpec(vocab_size=p.vocab_size, n_tokens=p.n_tokens, seed=p.seed,
                                       doc_len=p.doc_len, zipf_a=p.zipf_a, planted_fraction=p.planted_fraction,
                                       determinism=p.determinism, structure=p.structure)

    def load(self, workdir: Path, progress: Progress = no_progress) -> TokenCorpus:
        spec = self.spec()
        stream = synthetic.generate(spec)
        progress(stream.size)
        train, val = split_tail(stream, self.params.val_fraction, synthetic.EOS, "The synthetic corpus")
        info = {
            "source": "synthetic",
            "structure": synthetic.describe(spec),
            "entropy_rate_nats": synthetic.entropy_rate(spec),
            "val_entropy_bound_nats": synthetic.realised_entropy(spec, stream, start=train.size),
            "unigram_entropy_nats": _unigram_entropy(train, spec.vocab_size),
            "ln_vocab": float(np.log(spec.vocab_size)),
        }
        return _token_corpus(train, val, spec.vocab_size, synthetic.EOS, None, info)


# --------------------------------------------------------------------------- text tokenising

DEFAULT_EOS_TOKEN = "<|endoftext|>"
_COMMON_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")


def train_byte_bpe(documents: Iterable[str], vocab_size: int, eos_token: str):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the documents; eos_token is special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def _tokenizer_file(path: Path | str) -> tuple[Path, Path | None]:
    """tokenizer param → (tokenizer.json file, HF tokenizer directory or None). A GGUF file (or a
    directory holding one, or "pkg:<module>[/file]") gives the tokenizer stored in it, extracted
    once into the GGUF cache (ablate_builtins.gguf): the same file a GGUF teacher reads ids with."""
    path = gguf.resolve_path(path)
    file = gguf.gguf_in(path)
    if file is not None:
        entry = gguf.tokenizer_dir(file)
        return entry / "tokenizer.json", entry
    if str(path).lower().endswith(".gguf"):
        gguf.find_gguf(path)  # a missing .gguf: InputError naming it and the install command
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise InputError(f"Tokenizer directory {path} has no tokenizer.json. ablate reads fast "
                             f"tokenizers only: run `AutoTokenizer.from_pretrained('{path}').save_pretrained("
                             f"'{path}')` to write one, or point `tokenizer` at a tokenizer.json file.")
        return path / "tokenizer.json", path
    if not path.is_file():
        raise InputError(f"Tokenizer {path} does not exist. Set `tokenizer` to a `tokenizers` JSON file, to a "
                         f"Hugging Face tokenizer directory or to a GGUF file, or leave it out to train a "
                         f"byte-level BPE.")
    return path, None


def _configured_eos(tokenizer_dir: Path | None) -> str | None:
    """eos_token from a HF tokenizer directory's tokenizer_config.json, when there is one."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer_config.json").is_file():
        return None
    eos = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer(path: Path | str, eos_token: str | None):
    """(tokenizers.Tokenizer, tokenizer.json path, eos id) for a user-supplied tokenizer."""
    from tokenizers import Tokenizer

    file, tokenizer_dir = _tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise InputError(f"Tokenizer file {file} could not be read ({type(exc).__name__}: {exc}). "
                         f"Point `tokenizer` at a valid `tokenizers` JSON file.") from exc
    candidates = [eos_token] if eos_token else [e for e in (_configured_eos(tokenizer_dir), *_COMMON_EOS) if e]
    for name in candidates:
        eos_id = tok.token_to_id(name)
        if eos_id is not None:
            return tok, file, eos_id
    raise InputError(f"Tokenizer {file} has no end-of-document token among {candidates}. Set "
                     f"`eos_token` to the token that separates documents in this vocabulary.")


class TextParams(SplitParams):
    # Path | str: "pkg:<module>" is no filesystem path; _tokenizer_file resolves either and names a missing one
    tokenizer: Path | str | None = Field(None, description='tokenizer.json, HF tokenizer dir, or a GGUF file / '
                                                           '"pkg:<module>" (its tokenizer, as a GGUF teacher reads '
                                                           "it); none → train BPE")
    vocab_size: int = Field(8192, ge=300, description="size of the byte-level BPE trained when no tokenizer is given")
    eos_token: str | None = Field(None, description=f"document separator; default {DEFAULT_EOS_TOKEN} for a "
                                                    f"trained BPE, the tokenizer's own EOS otherwise")
    max_tokens: int | None = Field(None, ge=4, description="stop after this many tokens")


class _TextCorpus(Corpus):
    """Shared pipeline: documents → tokenizer (given or trained) → EOS-joined stream → split."""

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def tokenizer_file(self) -> Path | None:
        return None if self.params.tokenizer is None else _tokenizer_file(self.params.tokenizer)[0]

    def known_vocab_size(self) -> int | None:
        """The BPE's size when one is trained; else the given tokenizer's (a file read, no tokenising)."""
        if self.params.tokenizer is None:
            return self.params.vocab_size
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_file())).get_vocab_size(with_added_tokens=True)
        except InputError:
            raise
        except Exception:  # an unreadable file: load_tokenizer reports it when the corpus is loaded
            return None

    def source(self) -> str:
        raise NotImplementedError

    def load(self, workdir: Path, progress: Progress = no_progress) -> TokenCorpus:
        p = self.params
        workdir.mkdir(parents=True, exist_ok=True)
        saved = workdir / "tokenizer.json"
        if p.tokenizer is None:
            eos_token = p.eos_token or DEFAULT_EOS_TOKEN
            tok = train_byte_bpe(self.documents(), p.vocab_size, eos_token)
            eos_id = tok.token_to_id(eos_token)
            tok.save(str(saved))
        else:
            tok, file, eos_id = load_tokenizer(p.tokenizer, p.eos_token)
            shutil.copyfile(file, saved)
        stream = self._encode(tok, eos_id, progress)
        train, val = p.split_stream(stream, eos_id, f"The corpus at {self.source()}")
        info = {"source": self.source(), "tokenizer": str(p.tokenizer) if p.tokenizer else "trained byte-level BPE",
                "structure": f"text from {self.source()}, documents joined by EOS id {eos_id}"}
        return _token_corpus(train, val, tok.get_vocab_size(with_added_tokens=True), eos_id, saved, info)

    def _encode(self, tok, eos_id: int, progress: Progress, batch_docs: int = 256) -> np.ndarray:
        limit = self.params.max_tokens
        chunks: list[np.ndarray] = []
        total = 0
        for batch in _batched(self.documents(), batch_docs):
            ids = [np.append(np.asarray(e.ids, dtype=np.int32), np.int32(eos_id))
                   for e in tok.encode_batch(batch, add_special_tokens=False)]
            chunk = np.concatenate(ids)
            if limit is not None:
                chunk = chunk[: limit - total]
            chunks.append(chunk)
            total += chunk.size
            progress(chunk.size)
            if limit is not None and total >= limit:
                break
        if total == 0:
            raise InputError(f"The corpus at {self.source()} contains no text. Point `path` at files "
                             f"with non-empty documents.")
        return np.concatenate(chunks).astype(np.int64)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TextFilesParams(TextParams):
    path: Path = Field(description="folder of .txt / .jsonl files (or one such file)")
    glob: list[str] = Field(default_factory=lambda: ["**/*.txt", "**/*.jsonl"])
    text_field: str = Field("text", description="JSON key of the document text in .jsonl lines")
    install: str | None = Field(None, description="the command that puts the files at `path`, named in the error "
                                                  "when they are missing (e.g. a package install and a converter)")


class TextFilesCorpus(_TextCorpus):
    name = "text-files"
    Params = TextFilesParams
    description = ("A folder of .txt files (one document each) and .jsonl files (one document per "
                   "line); tokenised with a given tokenizer or a byte-level BPE trained on them.")

    def source(self) -> str:
        return str(self.params.path)

    def files(self) -> list[Path]:
        root = self.params.path.expanduser()
        if root.is_file():
            return [root]
        how = f" Create them with: {self.params.install}" if self.params.install else ""
        if not root.is_dir():
            raise InputError(f"Corpus folder {root} does not exist. Set [corpus] path to a folder of "
                             f".txt/.jsonl files.{how}")
        found = sorted({f for pattern in self.params.glob for f in root.glob(pattern) if f.is_file()})
        if not found:
            raise InputError(f"No files in {root} match {self.params.glob}. Put .txt/.jsonl files there or "
                             f"change [corpus] glob.{how}")
        return found

    def documents(self) -> Iterator[str]:
        for file in self.files():
            try:
                if file.suffix == ".jsonl":
                    yield from self._jsonl_documents(file)
                else:
                    text = file.read_text(encoding="utf-8")
                    if text:
                        yield text
            except UnicodeDecodeError as exc:
                raise InputError(f"Corpus file {file} is not UTF-8 text ({exc}). Convert it to UTF-8 or "
                                 f"exclude it with [corpus] glob.") from exc

    def _jsonl_documents(self, file: Path) -> Iterator[str]:
        field_name = self.params.text_field
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{file}:{number} is not valid JSON ({exc}). Fix the line or remove it.") from exc
                text = record.get(field_name) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise InputError(f"{file}:{number} has no string field {field_name!r} (found {keys}). "
                                     f"Set [corpus] text_field to the key that holds the document text.")
                if text:
                    yield text


# ---------------------------------------------------------------------------- token shards


class TokenFilesParams(SplitParams):
    paths: list[str] | str = Field(description="shard files or glob patterns, concatenated in order")
    vocab_size: int = Field(ge=2)
    eos_id: int = Field(ge=0)
    tensor: str = Field("tokens", description="tensor name inside .safetensors shards")
    tokenizer: Path | str | None = Field(None, description="the tokenizer that made the ids: tokenizer.json, HF "
                                                           "tokenizer dir or GGUF file (compared id by id with the "
                                                           "teacher's)")
    val_paths: list[str] | str | None = Field(None, description="separate validation shards")

    @model_validator(mode="after")
    def _eos_in_vocab(self):
        if self.eos_id >= self.vocab_size:
            raise ValueError(f"eos_id {self.eos_id} must be below vocab_size {self.vocab_size}")
        return self


def expand_paths(patterns: list[str] | str) -> list[Path]:
    """Shard patterns → files: each pattern's matches sorted, patterns kept in the given order."""
    files: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(globlib.glob(expanded, recursive=True)) if globlib.has_magic(expanded) else [expanded]
        matches = [Path(m) for m in matches if Path(m).is_file()]
        if not matches:
            raise InputError(f"Token shard path {pattern!r} matches no file. Set [corpus] paths to existing "
                             f".npy or .safetensors files (globs allowed).")
        files += matches
    return files


def read_shard(path: Path, tensor: str) -> np.ndarray:
    """One shard → flat int64 token ids [n]."""
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            if tensor not in names:
                raise InputError(f"Shard {path} has no tensor {tensor!r} (it has {names}). Set [corpus] "
                                 f"tensor to the name of the token tensor.")
            array = f.get_tensor(tensor)
    else:
        raise InputError(f"Token shard {path} is neither .npy nor .safetensors. Convert it, or list only "
                         f"such files in [corpus] paths.")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"Token shard {path} holds {array.dtype} values; token ids must be integers. "
                         f"Save the shard with an integer dtype.")
    return np.asarray(array, dtype=np.int64).reshape(-1)


class TokenFilesCorpus(Corpus):
    name = "token-files"
    Params = TokenFilesParams
    description = ("Pre-tokenised shards (.npy or .safetensors of integer ids), concatenated in order; "
                   "`tokenizer` names the tokenizer that made them.")

    def tokenizer_file(self) -> Path | None:
        return None if self.params.tokenizer is None else _tokenizer_file(self.params.tokenizer)[0]

    def _read(self, patterns, progress: Progress) -> np.ndarray:
        parts = []
        for path in expand_paths(patterns):
            ids = read_shard(path, self.params.tensor)
            if ids.size and (ids.min() < 0 or ids.max() >= self.params.vocab_size):
                bad = int(ids.max()) if ids.max() >= self.params.vocab_size else int(ids.min())
                raise InputError(f"Token shard {path} contains id {bad}, outside [0, {self.params.vocab_size}). "
                                 f"Set [corpus] vocab_size to the tokenizer's vocabulary size (at least "
                                 f"{int(ids.max()) + 1}) or fix the shard.")
            parts.append(ids)
            progress(ids.size)
        return np.concatenate(parts)

    def load(self, workdir: Path, progress: Progress = no_progress) -> TokenCorpus:
        p = self.params
        stream = self._read(p.paths, progress)
        if p.val_paths is None:
            train, val = p.split_stream(stream, p.eos_id, f"The token shards {p.paths}")  # val_* unused with val_paths
        else:
            train, val = stream, self._read(p.val_paths, progress)
            if train.size < 2 or val.size < 2:
                raise InputError(f"Token shards need at least 2 tokens in train ({train.size}) and validation "
                                 f"({val.size}). Check [corpus] paths and val_paths.")
        info = {"source": str(p.paths), "structure": f"pre-tokenised shards, EOS id {p.eos_id}",
                "tokenizer": str(p.tokenizer) if p.tokenizer else None}
        return _token_corpus(train, val, p.vocab_size, p.eos_id, self.tokenizer_file(), info)


# ------------------------------------------------------------------------------ HF datasets


class HFDatasetParams(TextParams):
    path: Path = Field(description="directory written by datasets' save_to_disk")
    split: str = "train"
    text_field: str = "text"


class HFDatasetCorpus(_TextCorpus):
    name = "hf-dataset"
    Params = HFDatasetParams
    description = "A Hugging Face dataset saved with save_to_disk (needs `pip install 'ablate[datasets]'`)."

    def source(self) -> str:
        return f"{self.params.path} (split {self.params.split})"

    def dataset(self):
        try:
            import datasets
        except ImportError as exc:
            raise InputError("The hf-dataset corpus needs the `datasets` package, which is not installed. "
                             "Run pip install 'ablate[datasets]', or export the text to .jsonl and use the "
                             "text-files corpus.") from exc
        path = self.params.path.expanduser()
        if not path.is_dir():
            raise InputError(f"Dataset directory {path} does not exist. Set [corpus] path to a folder written "
                             f"by `Dataset.save_to_disk`.")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if self.params.split not in loaded:
                raise InputError(f"Dataset {path} has no split {self.params.split!r} (it has "
                                 f"{sorted(loaded)}). Set [corpus] split.")
            loaded = loaded[self.params.split]
        if self.params.text_field not in loaded.column_names:
            raise InputError(f"Dataset {path} has no column {self.params.text_field!r} (it has "
                             f"{loaded.column_names}). Set [corpus] text_field.")
        return loaded

    def documents(self) -> Iterator[str]:
        column = self.params.text_field
        for record in self.dataset():
            text = record[column]
            if text:
                yield text


@hookimpl
def ablate_corpora(register: Callable[[type[Corpus]], None]) -> None:
    for cls in (SyntheticCorpus, TextFilesCorpus, TokenFilesCorpus, HFDatasetCorpus):
        register(cls)
