#!/usr/bin/env python3
"""Public-domain English prose for ablate's `text-files` corpus, from a Debian package: C. H.
Spurgeon's *The Treasury of David* (1869–1885; 2.16 M words, ≈ 2.82 M SmolLM2 tokens), which
Debian ships as the SWORD module `sword-comm-tdavid` (license: public-domain).

    apt-get install -y sword-comm-tdavid          # or, without root: apt-get download sword-comm-tdavid &&
                                                  #   dpkg -x sword-comm-tdavid_*.deb /tmp/tdavid-deb
    python scripts/tdavid-corpus.py [--module DIR] [--out data/tdavid]

writes one UTF-8 .txt file per SWORD block (the preface, then one per psalm: 152 documents) with
the OSIS markup removed and paragraphs separated by blank lines. Standard library only; ≈ 3 s.

A SWORD zCom4 module is a block index `*.czs` (per block: offset, compressed size, size; 3 × uint32
little-endian), the zlib-compressed blocks `*.czz`, and a per-verse index `*.czv` not needed here.
"""

from __future__ import annotations

import argparse
import html
import re
import struct
import sys
import zlib
from pathlib import Path

MODULE = Path("/usr/share/sword/modules/comments/zcom/tdavid")
INSTALL = "apt-get install -y sword-comm-tdavid && python scripts/tdavid-corpus.py"

PARAGRAPH_END = re.compile(r'<div\b[^>]*\beID="[^"]*"[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|</(?:l|item|title)>')
TAG = re.compile(r"<[^>]+>")


def blocks(module: Path):
    """The module's decompressed blocks (str), testament by testament, in index order."""
    indexes = sorted(module.glob("*.czs")) or sorted(module.glob("*.bzs"))
    for index in indexes:
        data = index.with_suffix(index.suffix[:-1] + "z").read_bytes()
        raw = index.read_bytes()
        for i in range(0, len(raw) - len(raw) % 12, 12):
            offset, size, _ = struct.unpack("<III", raw[i:i + 12])
            if size:
                yield zlib.decompress(data[offset:offset + size]).decode("utf-8", "replace")


def plain(osis: str) -> str:
    """OSIS markup → text: paragraph ends become blank lines, other tags vanish, entities decoded."""
    text = PARAGRAPH_END.sub("\n\n", osis)
    text = html.unescape(TAG.sub(" ", text))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", type=Path, default=MODULE, help=f"the SWORD module directory (default {MODULE})")
    parser.add_argument("--out", type=Path, default=Path("data/tdavid"), help="output folder (default data/tdavid)")
    args = parser.parse_args()
    if not any(args.module.glob("*.czs")) and not any(args.module.glob("*.bzs")):
        print(f"No SWORD module at {args.module}. Install it: {INSTALL} (Debian package sword-comm-tdavid), or "
              f"pass --module to an extracted copy (usr/share/sword/modules/comments/zcom/tdavid).", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    n_docs = n_words = 0
    for i, block in enumerate(blocks(args.module)):
        text = plain(block)
        if len(text.split()) < 20:  # the empty book heading blocks
            continue
        (args.out / f"tdavid-{i:03d}.txt").write_text(text, encoding="utf-8")
        n_docs += 1
        n_words += len(text.split())
    print(f"wrote {n_docs} documents, {n_words} words to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
