"""OpenAI CLIP's byte-level BPE vocabulary, rebuilt from the file shipped by
the ``clip-anytorch`` package (stdlib only, no torch).

No tokenizer files can be downloaded here, but ``clip-anytorch`` (installed
``--no-deps``) carries OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. The 49,408
token vocabulary and merge list of CLIP's tokenizer follow from that file by
the rule in OpenAI's ``simple_tokenizer.py``; ``write_tokenizer_files`` saves
them in the folder format ``transformers.CLIPTokenizer.from_pretrained``
reads, configured as Stable Diffusion 1.x does it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
# OpenAI keeps lines [1 : 49152 - 256 - 2 + 1] of the file (line 0 is a header).
_N_MERGES = 49152 - 256 - 2


def find_bpe_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``clip`` package.

    The package is located without being imported: importing ``clip`` needs
    ``pkg_resources``, which recent setuptools no longer ships.
    """
    spec = importlib.util.find_spec("clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / BPE_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{BPE_FILENAME} not found: install OpenAI CLIP's tokenizer data with `pip install --no-deps clip-anytorch`"
    )


def load_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The 48,894 BPE merges, in priority order."""
    path = Path(path) if path is not None else find_bpe_file()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (controls, space,
    soft hyphen) to chr(256 + n) in byte order. Dict order is the vocab order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """Token list whose index is the token id (49,408 entries for CLIP's merges)."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(pair) for pair in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return vocab


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, configs).

    Settings follow Stable Diffusion 1.x: max length 77, lower-casing, and
    ``<|endoftext|>`` as unk and pad token.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = load_merges()
    vocab = build_vocab(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, got {len(vocab)}")

    vocab_ids = {tok: i for i, tok in enumerate(vocab)}
    (out / "vocab.json").write_text(json.dumps(vocab_ids, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab_ids[BOS_TOKEN]): added(BOS_TOKEN),
            str(vocab_ids[EOS_TOKEN]): added(EOS_TOKEN),
        },
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
