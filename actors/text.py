"""Text clean-up and sentence splitting shared by every model family."""
from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"',
                         "–": "-", "—": " - ", "…": "...", "\u00a0": " "})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s+")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
# Pieces ending like this were not sentence ends ("Dr. Smith", "J. R. R. Tolkien").
_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|Mt|vs|etc|e\.g|i\.e|No|Fig|Inc|Ltd|Co)|\b[A-Z])\.$")


def normalize_text(text: str) -> str:
    """NFKC, plain quotes and dashes, no control characters, single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = _CONTROL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Sentences of normalized `text`, each at most `max_chars` long.

    Over-long sentences are cut at clause punctuation, then at word boundaries,
    and a single over-long word is cut hard, so nothing is dropped.
    """
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = piece.strip()
        if not piece:
            continue
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return [part for sentence in sentences for part in _fit(sentence, max_chars)]


def _fit(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    pieces = _CLAUSE_END.split(sentence)
    if len(pieces) == 1:
        pieces = sentence.split(" ")
        if len(pieces) == 1:
            return [sentence[i:i + max_chars] for i in range(0, len(sentence), max_chars)]
    out: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current} {piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            out.append(current)
        if len(piece) > max_chars:
            out.extend(_fit(piece, max_chars))
            current = ""
        else:
            current = piece
    if current:
        out.append(current)
    return out
