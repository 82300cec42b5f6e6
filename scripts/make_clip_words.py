"""Write e4tcli/data/clip_words.txt.gz: the whole-word tokens of CLIP's vocabulary.

Each vocab entry ending in "</w>" is one whole word to CLIP's tokenizer; the
file lists them with the suffix removed, sorted, one per line. It lets a
torch-free check decide whether a class word is a single CLIP token
(``word.lower() in words``; read with ``splitlines()``).

Vocab entries are in GPT-2's byte-level alphabet (UTF-8 "é" is stored as
"Ã©"), so each is mapped back to real text; entries that are partial UTF-8
sequences, or decode to whitespace/control characters, cannot be a typed
word and are left out (203 of 34,483). ASCII words are unchanged by this.
The gzip header has mtime=0 and no file name, so reruns give identical bytes.

Usage: python scripts/make_clip_words.py [OUT_PATH]
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from e4tcli.clip_bpe import build_vocab, bytes_to_unicode, load_merges  # noqa: E402

SUFFIX = "</w>"
DEFAULT_OUT = ROOT / "e4tcli" / "data" / "clip_words.txt.gz"


def _decode(token: str) -> str | None:
    """Byte-level token -> text, or None when it is not a typeable word."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        text = bytes(byte_of[c] for c in token).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and not any(c.isspace() for c in text) else None


def clip_words() -> list[str]:
    vocab = build_vocab(load_merges())
    decoded = (_decode(tok[: -len(SUFFIX)]) for tok in vocab if tok.endswith(SUFFIX))
    return sorted({w for w in decoded if w})


def write(out: Path) -> int:
    words = clip_words()
    data = ("\n".join(words) + "\n").encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return len(words)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    n = write(out)
    print(f"wrote {n} words to {out}")
