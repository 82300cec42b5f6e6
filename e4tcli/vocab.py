"""A torch-free answer to "is this word a single CLIP token?".

Stable Diffusion 1.x/2.x and XL (both its tokenizers) tokenise prompts with OpenAI CLIP's BPE vocabulary.
A class word must be one token so that the concept's embedding S* can start
from exactly that word's embedding. The whole-word entries of the vocabulary
ship in ``data/clip_words.txt.gz`` (made by ``scripts/make_clip_words.py``).
"""

import gzip
import re
from functools import lru_cache
from importlib import resources

_WORD_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


@lru_cache(maxsize=1)
def _whole_words() -> frozenset[str]:
    data = resources.files("e4tcli").joinpath("data/clip_words.txt.gz").read_bytes()
    return frozenset(gzip.decompress(data).decode("utf-8").splitlines())


def clip_token_count_hint(word: str) -> int:
    """How many pieces CLIP's pre-tokeniser splits ``word`` into (before BPE)."""
    return len(_WORD_PIECES.findall(word.lower()))


def is_single_clip_token(word: str) -> bool:
    """True when CLIP's tokenizer maps ``word`` to exactly one token."""
    text = " ".join(word.lower().split())
    return clip_token_count_hint(text) == 1 and text in _whole_words()
