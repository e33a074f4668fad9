"""The English text tokenizer asset (`tokenizer.json`, `tokenizers` format).

Released conventions (chatterbox EnTokenizer): a BPE model over characters with a
Whitespace pre-tokenizer and no normalizer; special tokens `[STOP]`=0, `[UNK]`=1,
`[SPACE]`=2 (the caller replaces every ' ' with `[SPACE]` before encoding) and
`[START]`=255; 704 ids in all.  T3 brackets the ids with start 255 / stop 0.

Random-init bundles get a synthetic tokenizer with the same conventions and the
same vocabulary size: special tokens, printable characters, then letter-pair
merges until the vocabulary is full.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from export.chatterbox.t3 import T3Config

START, STOP, UNK, SPACE = "[START]", "[STOP]", "[UNK]", "[SPACE]"
SPECIALS = [STOP, UNK, SPACE, "[PAD]", "[SEP]", "[CLS]", "[MASK]"]


def synthetic_tokenizer_json(cfg: T3Config) -> dict:
    """A `tokenizers` JSON document with the released conventions and `cfg.text_vocab_size` ids."""
    size, start_id, stop_id = cfg.text_vocab_size, cfg.start_text_token, cfg.stop_text_token
    vocab: dict[str, int] = {}
    free = (i for i in range(size) if i not in (start_id, stop_id))

    def add(token: str, idx: int | None = None) -> bool:
        if token in vocab:
            return True
        if idx is None:
            idx = next(free, None)
            if idx is None:
                return False
        vocab[token] = idx
        return True

    add(STOP, stop_id)
    add(START, start_id)
    for tok in SPECIALS[1:]:
        add(tok)
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + "'\",.!?-:;()&%$/" + \
        "àâäçéèêëîïôöùûüñ"
    for c in chars:
        add(c)
    merges: list[str] = []
    letters = string.ascii_lowercase
    for a in letters:
        for b in letters:
            if len(vocab) >= size:
                break
            if add(a + b):
                merges.append(f"{a} {b}")
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in [STOP, UNK, SPACE, *SPECIALS[3:], START]]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def write_synthetic_tokenizer(dest: Path, cfg: T3Config) -> Path:
    Path(dest).write_text(json.dumps(synthetic_tokenizer_json(cfg), ensure_ascii=False, indent=1))
    check_tokenizer(Path(dest), cfg, str(dest))
    return Path(dest)


def check_tokenizer(path: Path, cfg: T3Config, label: str) -> dict:
    """Open `path` with `tokenizers` and check the conventions T3 relies on; returns a summary."""
    from export.chatterbox.checkpoint import CheckpointError
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{label} is not a readable tokenizers JSON file ({type(e).__name__}: {e})") \
            from None
    vocab = tok.get_vocab(with_added_tokens=True)
    for token in (START, STOP):
        if token not in vocab:
            raise CheckpointError(f"{label}: vocabulary has no {token} token")
    if vocab[START] != cfg.start_text_token or vocab[STOP] != cfg.stop_text_token:
        raise CheckpointError(f"{label}: {START}/{STOP} ids are {vocab[START]}/{vocab[STOP]}, the model "
                              f"expects {cfg.start_text_token}/{cfg.stop_text_token}")
    top = max(vocab.values())
    if top >= cfg.text_vocab_size:
        raise CheckpointError(f"{label}: token id {top} is outside the model's text vocabulary "
                              f"({cfg.text_vocab_size} ids)")
    return {"vocab_size": len(vocab), "max_id": top, "space_token": SPACE if SPACE in vocab else None}
