"""Chatterbox text front end: the official punctuation clean-up, chunking of long texts, tokenization."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from actors.bundle import Bundle
from actors.errors import BundleError
from actors.text import normalize_text, split_sentences

SPACE = "[SPACE]"
# The official clean-up's replacements, in its order (LLM punctuation the model rarely saw).
_REPLACEMENTS = (("...", ", "), ("…", ", "), (":", ","), (" - ", ", "), (";", ", "), ("—", "-"), ("–", "-"),
                 (" ,", ","), ("“", '"'), ("”", '"'), ("‘", "'"), ("’", "'"))
_ENDERS = (".", "!", "?", "-", ",")


def punc_norm(text: str) -> str:
    """The official model's text clean-up (`punc_norm`); empty text is the caller's error, not a sentence."""
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    return text if text.endswith(_ENDERS) else text + "."


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Texts for one T3 call each: the text itself when short (exactly what the official model gets),
    else its sentences packed in order into chunks of at most `max_chars`."""
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    for sentence in split_sentences(normalize_text(text), max_chars):
        if chunks and len(chunks[-1]) + 1 + len(sentence) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {sentence}"
        else:
            chunks.append(sentence)
    return chunks


class TextTokenizer:
    """The bundle's `tokenizers` vocabulary, used as the official English tokenizer uses it."""

    def __init__(self, bundle: Bundle) -> None:
        path: Path = bundle.asset("text_tokenizer")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
            raise BundleError(f"bundle {bundle.path}: text tokenizer {path.name} cannot be read: {e}") from None
        tokens = bundle.manifest["model"]["tokens"]
        self.start, self.stop = int(tokens["start_text"]), int(tokens["stop_text"])
        self.max_tokens = int(bundle.manifest["model"]["t3"]["text_positions"])

    def encode(self, text: str) -> np.ndarray:
        """T3 text ids of one chunk: cleaned, spaces as [SPACE], wrapped in start/stop text tokens."""
        ids = self.tokenizer.encode(punc_norm(text).replace(" ", SPACE)).ids
        if len(ids) + 2 > self.max_tokens:
            raise ValueError(f"a text chunk has {len(ids)} tokens, more than T3's {self.max_tokens - 2}; "
                             "lower the t3 stage's max_chunk_chars")
        return np.array([self.start, *ids, self.stop], dtype=np.int64)
