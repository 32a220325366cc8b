"""Tokenizer identity (reference §12): a corpus's ids mean the same text to a teacher only when
both tokenizers map every id to the same token. Equal sizes prove nothing: Mistral-7B-v0.1 and
Llama-2 (TinyLlama's) both have 32,000 entries and agree only on ids 0–2.

A tokenizer is summarised by a digest of its id→token map (shown in the report). The corpus's
map is compared id by id with the teacher's over the corpus tokenizer's ids (the teacher may
have more). A mismatch is a spec error unless `[teacher] tokenizer_mismatch = "allow"`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ablate.errors import InputError, SpecError

SAMPLE_TEXTS = ("Hello, world!", "The quick brown fox jumps over the lazy dog.")


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int]):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    return tok, tuple(tokens)


def read(file: Path) -> tuple[Any, tuple[str | None, ...]]:
    """(tokenizers.Tokenizer, tokens by id [entries]; None where no token has that id)."""
    file = Path(file)
    try:
        stat = file.stat()
        return _read(str(file.resolve()), (stat.st_mtime_ns, stat.st_size))
    except Exception as exc:
        raise InputError(f"Tokenizer file {file} could not be read ({type(exc).__name__}: {exc}). Point the "
                         f"corpus's or the teacher's tokenizer at a valid `tokenizers` JSON file.") from exc


def digest(tokens: tuple[str | None, ...]) -> str:
    """A short hash of the id→token map (tokens in id order)."""
    return "sha256:" + hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()[:16]


def describe(file: Path) -> dict[str, Any]:
    """{"file", "entries", "digest"} of a tokenizer.json."""
    tokens = read(file)[1]
    return {"file": str(file), "entries": len(tokens), "digest": digest(tokens)}


def differing_ids(corpus: tuple[str | None, ...], teacher: tuple[str | None, ...]) -> list[int]:
    """Ids of the corpus tokenizer that the teacher's maps to another token (or to none)."""
    return [i for i, t in enumerate(corpus) if t is not None and (i >= len(teacher) or teacher[i] != t)]


def samples(corpus_file: Path, teacher_file: Path, differing: list[int], n: int = 3, per: int = 4
            ) -> list[tuple[str, list[int], list[int]]]:
    """Up to n (text, corpus ids, teacher ids) whose id sequences differ: fixed English strings
    first, then texts made of differing ids spread over the vocabulary, `per` tokens each."""
    corpus_tok, teacher_tok = read(corpus_file)[0], read(teacher_file)[0]
    step = max(1, len(differing) // (n * per))
    picked = differing[::step]
    texts = list(SAMPLE_TEXTS) + [corpus_tok.decode(picked[k:k + per]) for k in range(0, len(picked), per)]
    out = []
    for text in texts:
        try:
            ours = corpus_tok.encode(text, add_special_tokens=False).ids
            theirs = teacher_tok.encode(text, add_special_tokens=False).ids
        except Exception:  # e.g. a word-level vocabulary without an unknown token
            continue
        if text.strip() and ours != theirs:
            out.append((text, ours, theirs))
        if len(out) == n:
            break
    return out


def check(corpus_file: Path | None, teacher, source: str = "spec") -> dict[str, Any]:
    """Compare the corpus's tokenizer with the one `teacher` (a Teacher) reads.

    Returns the record kept in results.json: {"corpus": describe() | None, "teacher": describe() |
    "corpus" (learns the corpus's ids) | None, "match": True | False | None (not comparable),
    "tokenizer_mismatch": the teacher's setting}. A mismatch raises SpecError unless the teacher's
    `tokenizer_mismatch` is "allow".
    """
    mode = getattr(teacher.params, "tokenizer_mismatch", "error")
    theirs = teacher.tokenizer()
    record: dict[str, Any] = {"corpus": describe(corpus_file) if corpus_file is not None else None,
                              "teacher": describe(theirs) if isinstance(theirs, Path) else theirs,
                              "match": True if theirs == "corpus" else None, "tokenizer_mismatch": mode}
    if corpus_file is None or not isinstance(theirs, Path):
        return record
    diff = differing_ids(read(corpus_file)[1], read(theirs)[1])
    record["match"] = not diff
    if diff and mode != "allow":
        c, t = record["corpus"], record["teacher"]
        same_size = " although both have the same number of entries" if c["entries"] == t["entries"] else ""
        shown = "; ".join(f"{text!r}: corpus {a} | teacher {b}" for text, a, b in samples(corpus_file, theirs, diff))
        raise SpecError([("teacher", (
            f"the corpus's ids come from the tokenizer {corpus_file} ({c['entries']} entries, id→token digest "
            f"{c['digest']}) but teacher {teacher.name!r} reads ids with {theirs} ({t['entries']} entries, digest "
            f"{t['digest']}): {len(diff)} of the corpus's ids map to different tokens{same_size}, so the teacher "
            f"would read scrambled text and its oracle would carry no corpus signal (the reference's TinyLlama "
            f"runs did this). Examples (text: corpus ids | teacher ids): {shown or 'none encodable'}. Fix: "
            f"re-tokenise the corpus with the teacher's tokenizer ([corpus] tokenizer = \"{theirs}\") and train "
            f"the backbone on that corpus, or use a teacher whose tokenizer made the corpus; to run this pairing "
            f"on purpose (to reproduce the reference) set [teacher] tokenizer_mismatch = \"allow\", and the report "
            f"carries a warning banner"))], source)
    return record


def spec_problems(spec, registry) -> list[tuple[str, str]]:
    """The tokenizer check of a spec as (location, message) problems, for `ablate validate`
    (spec.check_references); [] when a side is unknown, or when the corpus or teacher parameters,
    files or weights have problems of their own (reported by their own checks)."""
    try:
        corpus_cls = registry.get("corpus", spec.corpus.plugin)
        teacher_cls = registry.get("teacher", spec.teacher.plugin)
        corpus = corpus_cls(corpus_cls.Params.model_validate(spec.corpus.params()))
        check(corpus.tokenizer_file(), teacher_cls(teacher_cls.Params.model_validate(spec.teacher.params())))
    except SpecError as exc:
        return exc.problems
    except Exception:  # invalid parameters, a missing file, unreachable weights: not this check's to report
        return []
    return []
