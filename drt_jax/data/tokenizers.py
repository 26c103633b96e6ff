"""Tokenizers: a small protocol, a file-free byte tokenizer and a wrapper around
Hugging Face `tokenizers` JSON files.

Every tokenizer exposes the three special ids the model and the pipeline need:
`pad_id` (padding, never a loss target), `eos_id` (document separator in packed
mode) and `landmark_id` (reserved for DRT's chunk landmarks).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from drt_jax.data.config import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
PAD_TOKEN = "<pad>"
LANDMARK_TOKEN = "<landmark>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the model need from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def landmark_id(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """Stable identity; token shards are rebuilt when it changes."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then pad, eos, landmark."""

    vocab_size = 259
    pad_id = 256
    eos_id = 257
    landmark_id = 258
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """Fast path for sharding: the token ids as a bytes object (uint8)."""
        return text.encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        # Special ids carry no text; dropping them keeps decode(encode(s)) == s.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json.

    eos is the first of EOS_CANDIDATES present in the vocabulary. "<pad>" and
    "<landmark>" are used when present; otherwise they get fresh ids appended
    after the tokenizer's own vocabulary, so `vocab_size` grows by one for
    each appended token (the model's embedding must use `vocab_size`).
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DataError(_missing_file_message(self.path))
        with open(self.path, "rb") as f:
            raw = f.read()
        self._tok = _HFTokenizer.from_str(raw.decode("utf-8"))
        self._base_size = self._tok.get_vocab_size(with_added_tokens=True)
        next_id = self._base_size
        eos = self._find(EOS_CANDIDATES)
        if eos is None:
            eos, next_id = next_id, next_id + 1
        pad = self._find((PAD_TOKEN,))
        if pad is None:
            pad, next_id = next_id, next_id + 1
        landmark = self._find((LANDMARK_TOKEN,))
        if landmark is None:
            landmark, next_id = next_id, next_id + 1
        self._eos, self._pad, self._landmark = eos, pad, landmark
        self._vocab_size = next_id
        self._specials = {eos, pad, landmark}
        self._fingerprint = "hf-" + hashlib.sha256(raw).hexdigest()[:16]

    def _find(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def landmark_id(self) -> int:
        return self._landmark

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Parallel (Rust-side) encoding used when sharding."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        # Appended ids are unknown to the HF tokenizer, and specials carry no text.
        kept = [int(i) for i in ids if int(i) < self._base_size and int(i) not in self._specials]
        return self._tok.decode(kept, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def load_tokenizer(spec: str) -> Tokenizer:
    """ "byte" -> ByteTokenizer; a path to tokenizer.json -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(_missing_file_message(path))
    return HFTokenizer(path)


def _missing_file_message(path: str) -> str:
    return (
        f"tokenizer file not found: {path!r}; use tokenizer='byte' or train one with "
        f"`python -m drt_jax.data.train_bpe --corpus PATH --vocab-size N --out {path}`"
    )
