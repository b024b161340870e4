"""Tiny tokenizers built offline, for tiny random diffusers/transformers components in tests.

Nothing here downloads: the CLIP tokenizer is the real ``CLIPTokenizer`` class on a byte-level
vocabulary with no merges; the T5 tokenizer is a ``T5TokenizerFast`` on a unigram
vocabulary of letters and a few words. Both save with ``save_pretrained`` and load back with ``from_pretrained``
the way a hub checkpoint's tokenizer folder does.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 1000  # the tiny text encoders' vocabulary (>= every id the tokenizers produce)


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's and CLIP's byte-to-unicode table)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def clip_tokenizer(path: Path):
    """A CLIPTokenizer (byte-level vocabulary, ids < 514) saved to ``path`` and loaded back."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    tok.save_pretrained(str(path))
    return CLIPTokenizer.from_pretrained(str(path))


def t5_tokenizer(path: Path):
    """A T5 tokenizer (sentencepiece-style unigram over letters and a few words), saved to ``path`` and loaded back."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + w for w in ("a", "cat", "dog", "horse", "photo", "of", "an", "the", "bird", "monkey")]
    tok = T5TokenizerFast(vocab=[(p, 0.0 if i < 4 else -1.0 - 0.1 * len(p)) for i, p in enumerate(pieces)],
                          extra_ids=0, model_max_length=16)
    tok.save_pretrained(str(path))
    return T5TokenizerFast.from_pretrained(str(path))
