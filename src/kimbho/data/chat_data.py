"""Fine-tuning data: conversations tokenized with the model's chat format, targets on the replies
only, packed into full rows, and the sampler the trainer reads them with.

A chat data directory (`kimbho finetune` writes one into RUN_DIR/data/) holds

    meta.json        format kimbho-chat-v1: tokenizer hash, row length, per split the rows,
                     conversations, tokens, targets, padding and a SHA-256; the inputs' SHA-256s
    tokenizer.json   the model's tokenizer
    train.npy        int32 (rows, 4, seq_len): inputs, targets (IGNORE where nothing is learnt),
    val.npy          positions (restarting at 0 per conversation), segments (numbering them)

Conversations are packed best-fit decreasing: longest first, each into the fullest row it still
fits, so rows are nearly full (the padding fraction is in meta.json) and a conversation is never
split. Attention stays within a conversation and positions restart for each (see
`KimbhoV1Model.forward`), so a packed row gives every conversation the loss it gets alone.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import KimbhoError
from ..model.loss import IGNORE
from ..storage.files import sha256_of_file
from ..storage.staging import staged_directory
from .conversations import Conversation, Skipped, read_conversations, summarize_skipped
from .shards import Batch
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # a chat format is the inference stage's; the data stage only calls it
    from ..inference.chat import ChatFormat
    from ..retrieval.augment import Augmenter

log = logging.getLogger("kimbho")

FORMAT = "kimbho-chat-v1"
_INPUTS, _TARGETS, _POSITIONS, _SEGMENTS = range(4)


@dataclass(frozen=True)
class Example:
    """One conversation as ids and, per id, whether it is a target (predicted from those before)."""

    ids: list[int]
    is_target: list[bool]
    where: str


def tokenize(
    conversations: Sequence[Conversation],
    chat_format: ChatFormat,
    seq_len: int,
    augmenter: Augmenter | None = None,
) -> tuple[list[Example], list[Skipped]]:
    """Each conversation through `chat_format.encode_conversation`; one longer than a row
    (seq_len + 1 ids: the row's inputs and its last target) is skipped, as is one whose format
    refuses it. With `augmenter`, the last user message of each first gets the passages
    retrieved for it, as `serve --index` gives them."""
    examples, skipped = [], []
    for c in conversations:
        try:
            messages, targets = [m.as_dict() for m in c.messages], [m.train for m in c.messages]
            if augmenter is not None:
                messages = augmenter.conversation(messages, targets)[0]
            ids, is_target = chat_format.encode_conversation(messages, targets)
        except KimbhoError as e:
            skipped.append(Skipped(c.where, str(e)))
            continue
        if len(ids) > seq_len + 1:
            skipped.append(Skipped(c.where, f"{len(ids)} tokens, longer than the context of {seq_len + 1}"))
        elif not any(is_target[1:]):
            skipped.append(Skipped(c.where, "no reply token left to learn from"))
        else:
            examples.append(Example(ids, is_target, c.where))
    return examples, skipped


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most `capacity` for items of `lengths` (each at most `capacity`), best-fit
    decreasing: each item, longest first, goes to the fullest bin it fits. The indices per bin."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin), sorted: the fullest bin that fits by bisection
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            row, left = len(bins) - 1, capacity - lengths[i]
        else:
            left, row = free.pop(at)
            bins[row].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, row))
    return bins


def pack(examples: Sequence[Example], seq_len: int) -> tuple[np.ndarray, list[list[int]]]:
    """Rows (n, 4, seq_len) int32 of inputs, targets, positions and segments, best-fit decreasing,
    and the examples of each row by segment (row r's segment s is `examples[members[r][s]]`).
    An example of L ids fills L - 1 positions: it predicts ids[1:] from ids[:-1]. Padding predicts
    nothing and is a segment of its own."""
    lengths = [len(e.ids) - 1 for e in examples]
    rows = best_fit(lengths, seq_len)
    out = np.zeros((len(rows), 4, seq_len), dtype=np.int32)
    out[:, _TARGETS] = IGNORE
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members):
            ids, n = examples[i].ids, lengths[i]
            targets = [
                t if learn else IGNORE for t, learn in zip(ids[1:], examples[i].is_target[1:], strict=True)
            ]
            out[r, _INPUTS, start : start + n] = ids[:-1]
            out[r, _TARGETS, start : start + n] = targets
            out[r, _POSITIONS, start : start + n] = np.arange(n)
            out[r, _SEGMENTS, start : start + n] = segment
            start += n
        out[r, _SEGMENTS, start:] = len(members)  # padding: attends to itself only
        out[r, _POSITIONS, start:] = np.arange(seq_len - start)
    return out, rows


def prepare_chat(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    chat_format: ChatFormat,
    out: Path,
    seq_len: int,
    val_fraction: float = 0.05,
    force: bool = False,
    augmenter: Augmenter | None = None,
) -> dict[str, Any]:
    """Read, tokenize, split (whole conversations, spread over the files) and pack the fine-tuning
    data into the chat data directory `out`, complete or absent. Skipped lines are reported in one
    summary; nothing usable left is a KimbhoError. `augmenter`: retrieval (`finetune --index`)."""
    if not 0 <= val_fraction < 1:
        raise KimbhoError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    read = read_conversations(inputs)
    examples, skipped = tokenize(read.conversations, chat_format, seq_len, augmenter)
    skipped = read.skipped + skipped
    if not examples:
        raise KimbhoError(f"no usable conversation: {summarize_skipped(skipped)}")
    if skipped:
        log.warning(f"fine-tuning data: {summarize_skipped(skipped)}")
    # Systematic sampling, as `prepare` does: conversation i is held out when (i + 1/2) * f
    # crosses an integer.
    held_out = [
        math.floor((i + 1) * val_fraction + 0.5) > math.floor(i * val_fraction + 0.5)
        for i in range(len(examples))
    ]
    splits = {
        "train": [e for e, v in zip(examples, held_out, strict=True) if not v],
        "val": [e for e, v in zip(examples, held_out, strict=True) if v],
    }
    if not splits["train"]:
        raise KimbhoError("every conversation went to validation; lower --val-fraction or add data")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "inputs": [{"path": str(p), "sha256": sha256_of_file(Path(p))} for p in inputs],
        "skipped": len(skipped),
        "splits": {},
    }
    with staged_directory(out, force) as tmp:
        for split, members in splits.items():
            rows = pack(members, seq_len)[0] if members else np.zeros((0, 4, seq_len), dtype=np.int32)
            np.save(tmp / f"{split}.npy", rows)
            meta["splits"][split] = _split_info(rows, members)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_rows(data_dir: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """A split's packed rows, memory-mapped, checked against meta.json's shape."""
    path = data_dir / f"{split}.npy"
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise KimbhoError(f"{path} is missing or corrupt ({e}); run kimbho finetune again") from None
    if rows.dtype != np.int32 or rows.shape != (meta["splits"][split]["rows"], 4, meta["seq_len"]):
        raise KimbhoError(f"{path} does not hold the rows meta.json describes; run kimbho finetune again")
    return rows


def verify_rows(rows: np.ndarray, path: Path, vocab_size: int, sha256: str, check_hash: bool) -> None:
    """Refuse rows that are not what `prepare_chat` wrote: ids outside the vocabulary, or (with
    `check_hash`) contents whose SHA-256 differs from meta.json's."""
    ids = rows[:, [_INPUTS, _TARGETS]]
    if len(rows) and (int(ids.max()) >= vocab_size or int(rows[:, _INPUTS].min()) < 0):
        raise KimbhoError(
            f"{path} holds token ids outside the vocabulary of {vocab_size}: run kimbho finetune again"
        )
    if check_hash and hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest() != sha256:
        raise KimbhoError(f"{path} does not match the SHA-256 in meta.json: it is corrupt or was changed")


class PackedSampler:
    """The trainer's batches of packed rows, a pure function of (seed, step): the rows in a fresh
    shuffle each epoch, batch after batch, so resuming at any step reads the same batch."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int) -> None:
        if len(rows) == 0:
            raise KimbhoError("the fine-tuning data has no training rows")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.targets_per_row = (np.asarray(rows[:, _TARGETS]) != IGNORE).sum(axis=1)

    def indices(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(flat, len(self.rows))
        out = np.empty_like(flat)
        for epoch in np.unique(epochs):
            out[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
        return out

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one sampler per run): batch and num_targets share an epoch's order
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        return to_batch(self.rows[np.sort(self.indices(step)[rows])])

    def num_targets(self, step: int) -> int:
        """Targets learnt from in the whole batch `step`, over all processes' rows."""
        return int(self.targets_per_row[self.indices(step)].sum())

    def state_dict(self, next_step: int) -> dict[str, int]:
        return {
            "next_step": next_step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rows": len(self.rows),
        }


def to_batch(rows: np.ndarray) -> Batch:
    """Packed rows (n, 4, seq_len) as a model batch."""
    t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return Batch(t[:, _INPUTS], t[:, _TARGETS], t[:, _POSITIONS], t[:, _SEGMENTS])


def val_batches(rows: np.ndarray, batch_size: int, max_tokens: int | None) -> Iterator[Batch]:
    """The validation rows in order, up to `max_tokens` positions' worth."""
    limit = len(rows) if max_tokens is None else max(1, max_tokens // rows.shape[-1])
    for start in range(0, min(limit, len(rows)), batch_size):
        yield to_batch(rows[start : min(start + batch_size, limit)])


def _split_info(rows: np.ndarray, members: Sequence[Example]) -> dict[str, Any]:
    positions = rows.shape[0] * rows.shape[-1]
    tokens = sum(len(e.ids) - 1 for e in members)
    return {
        "rows": int(rows.shape[0]),
        "conversations": len(members),
        "tokens": tokens,
        "targets": int((rows[:, _TARGETS] != IGNORE).sum()),
        "padding_fraction": 1 - tokens / positions if positions else 0.0,
        "sha256": hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest(),
    }
