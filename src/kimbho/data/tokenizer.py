"""Byte-level BPE tokenizer: a thin, typed wrapper around Hugging Face `tokenizers`.

Byte-level means every string, in any script, round-trips exactly: text is split with the GPT-2
pre-tokenizer pattern, mapped to bytes, and merged; decoding reverses it. Special tokens sit at
fixed ids so a model and its data agree without looking: `<|pad|>` = 0 (the seed's `pad_idx`),
`<|endoftext|>` = 1 (between documents), then the chat role markers. Special tokens are never
produced from text: a document that contains the literal string "<|endoftext|>" is encoded as
ordinary text, so user data cannot forge a document boundary.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import KimbhoError

PAD = "<|pad|>"
EOT = "<|endoftext|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOT, *ROLE_TOKENS)
_EOT_NAMES = (EOT, "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")  # end-of-text in imported tokenizers
_PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>")


class Tokenizer:
    """Text <-> token ids. `encode` adds no special tokens; `decode` returns exactly the text."""

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        # Special-token strings inside the text are encoded as plain text (see module docstring).
        self.inner.encode_special_tokens = True
        vocab = inner.get_vocab(with_added_tokens=True)
        self.eot_id: int | None = next((vocab[t] for t in _EOT_NAMES if t in vocab), None)
        self.pad_id: int | None = next((vocab[t] for t in _PAD_NAMES if t in vocab), None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise KimbhoError(
                f"tokenizer file {path} does not exist; train one with `kimbho tokenizer train`"
            )
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise KimbhoError(
                f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})"
            ) from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
        """Train byte-level BPE on `texts` (streamed) for a vocabulary of at most `vocab_size`
        (a small corpus may support fewer merges; `vocab_size` of the result tells)."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise KimbhoError(
                f"vocab size {vocab_size} is too small: byte-level BPE needs at least {minimum}"
            )
        inner = HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        seen = _CountingIterator(texts)
        inner.train_from_iterator(seen, trainer=trainer)
        if seen.characters == 0:
            raise KimbhoError("cannot train a tokenizer on an empty corpus: the input holds no text")
        return cls(inner)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json atomically, replacing any file there (see `storage/staging.py`)."""
        from ..storage.staging import staged_file

        with staged_file(Path(path), force=True) as tmp:
            tmp.write_text(self.to_json())

    def to_json(self) -> str:
        return self.inner.to_str()

    @property
    def sha256(self) -> str:
        """Fingerprint of the vocabulary and merges, so data and checkpoints can check they agree."""
        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # Through the batch call: it releases the GIL (a text of megabytes holds it for seconds through
        # `encode`, stalling every other thread, the server's event loop among them) and runs
        # in parallel in Rust.
        return self.inner.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_marked(self, text: str) -> list[int]:
        """As `encode`, except that the text of a special token ("<|endoftext|>") becomes that
        token: how Hugging Face tokenizers and vLLM's /tokenize read text. For other runtimes'
        clients (the server's /tokenize) and chat templates' output; Kimbho itself never reads
        markers out of user text."""
        return self.marked.encode_batch_fast([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def marked(self) -> HFTokenizer:
        """The underlying tokenizer with special-token text recognised (see `encode_marked`)."""
        inner = HFTokenizer.from_str(self.to_json())
        inner.encode_special_tokens = False
        return inner

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel in Rust (the `_fast` variant skips offset
        tracking we never use: about twice the throughput)."""
        return [e.ids for e in self.inner.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def special_tokens(self) -> set[str]:
        return {t.content for t in self.inner.get_added_tokens_decoder().values() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def text_stream(self) -> TextStream:
        """An incremental decoder: feed it generated ids one at a time, get text pieces back."""
        return TextStream(self)

    @functools.cached_property
    def token_bytes(self) -> list[bytes] | None:
        """The bytes each id stands for, when the decoder is byte-level (None otherwise).

        Mirrors the `tokenizers` ByteLevel decoder: each character of the token's string maps
        back to one byte through GPT-2's byte-to-character table; a token with a character
        outside that table (an added token, say) stands for its own UTF-8 encoding."""
        if not isinstance(self.inner.decoder, decoders.ByteLevel):
            return None
        to_byte = {char: byte for byte, char in _byte_to_char().items()}
        table = []
        for i in range(self.vocab_size):
            token = self.inner.id_to_token(i) or ""
            mapped = [to_byte.get(c) for c in token]
            table.append(token.encode() if None in mapped else bytes(mapped))  # type: ignore[arg-type]
        return table

    @functools.cached_property
    def _byte_lengths(self) -> np.ndarray | None:
        """UTF-8 bytes each id stands for (special tokens: none), when the decoder is byte-level."""
        table = self.token_bytes
        if table is None:
            return None
        lengths = np.array([len(b) for b in table], dtype=np.int64)
        for token_id in self.inner.get_added_tokens_decoder():
            if token_id < len(lengths) and self.inner.id_to_token(token_id) in self.special_tokens:
                lengths[token_id] = 0
        return lengths

    def count_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes of the text `ids` stand for, special tokens counting none: the denominator
        of bits per byte. Exact per id for a byte-level tokenizer (ids past its table, from a
        vocabulary padded for speed, stand for nothing); otherwise the length of the decoded text."""
        lengths = self._byte_lengths
        if lengths is None:
            return len(self.decode(np.asarray(ids).tolist(), skip_special_tokens=True).encode())
        ids = np.asarray(ids, dtype=np.int64)
        return int(lengths[ids[ids < len(lengths)]].sum())


class TextStream:
    """Turns ids, fed one at a time, into text pieces that are always whole characters, so that
    the pieces joined equal `tokenizer.decode(all ids)`.

    A byte-level BPE token may end inside a multi-byte character; its bytes are held back until
    the character is complete (an incremental UTF-8 decoder does exactly that, and replaces
    invalid bytes the way `tokenizers` does). For tokenizers that are not byte-level, the text
    of all ids so far is decoded again and only a stable extension is emitted: a trailing
    U+FFFD (an incomplete byte-fallback character) waits for the next id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes (possibly empty)."""
        if self._bytes is not None:
            # A model may have more ids than its tokenizer (vocabulary padded for speed); those
            # ids stand for no text, as in `decode`.
            return self._utf8.decode(self._bytes[token_id] if token_id < len(self._bytes) else b"")
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        piece, self._emitted = text[len(self._emitted) :], text
        return piece

    def flush(self) -> str:
        """Whatever is held back, at the end of generation (invalid bytes become U+FFFD)."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids)
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece


@functools.cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE: printable Latin-1
    bytes stand for themselves, the other 68 bytes for the characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _CountingIterator(Iterator[str]):
    """Passes texts through while counting characters, to detect an empty corpus."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = iter(texts)
        self.characters = 0

    def __next__(self) -> str:
        text = next(self._texts)
        self.characters += len(text)
        return text
