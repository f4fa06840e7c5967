"""Token data: `prepare` turns raw text into token shards; datasets and samplers read them back.

A prepared data directory holds

    meta.json                 tokenizer hash, vocab size, dtype, token/document/byte counts, sources
    tokenizer.json            the tokenizer the shards were made with
    train-00000.npy ...       token ids (uint16 when the vocabulary fits, else uint32), documents
    val-00000.npy ...         separated by the end-of-text token; `numpy.load(mmap_mode="r")` reads them

`prepare` streams: it holds one shard buffer and one batch of text in memory, whatever the corpus
size. The validation split takes whole sections (documents, or ~32 KiB pieces of long ones), every
k-th, so it is spread over the corpus and its share is exactly `val_fraction` of the sections.
The directory appears complete or not at all: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import KimbhoError
from ..model.loss import IGNORE
from .sources import SourceSpan

log = logging.getLogger("kimbho")

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Batch:
    """Rows of model inputs and their next-token targets, (B, T) each. Packed rows (fine-tuning)
    also carry each token's position within its example and the example's number in the row
    (`segments`), and IGNORE targets where nothing is learnt (see `KimbhoV1Model.forward`)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def rows(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self._tensors()))  # type: ignore[arg-type]

    def to(self, device: torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self._tensors()))  # type: ignore[arg-type]

    def loss(self, model: torch.nn.Module, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy of `model` (a KimbhoV1Model, or DDP around one) on these rows."""
        return model(
            self.inputs,
            positions=self.positions,
            segments=self.segments,
            targets=self.targets,
            reduction=reduction,
        )

    def num_targets(self) -> int:
        """How many targets are learnt from (all but the IGNORE ones)."""
        return int((self.targets != IGNORE).sum())

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.inputs, self.targets, self.positions, self.segments)


def window_batches(windows: Iterable[torch.Tensor], batch_size: int) -> Iterator[Batch]:
    """Windows of ids (each predicting all but its first token) as batches of up to `batch_size`
    windows of equal length."""
    pending: list[torch.Tensor] = []
    for window in itertools.chain(windows, [None]):  # None: the end, which flushes the last batch
        if pending and (window is None or len(pending) == batch_size or len(window) != len(pending[0])):
            chunk = torch.stack(pending)
            yield Batch(chunk[:, :-1], chunk[:, 1:])
            pending = []
        if window is not None:
            pending.append(window)


# --- reading prepared data -------------------------------------------------------------------


TOKENS_FORMAT = "kimbho-tokens-v1"


def load_meta(
    data_dir: str | os.PathLike[str], formats: tuple[str, ...] = (TOKENS_FORMAT,)
) -> dict[str, Any]:
    """A data directory's meta.json, of one of `formats` (`prepare`'s token shards by default;
    the trainer also reads `kimbho finetune`'s packed conversations, `chat_data.FORMAT`)."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise KimbhoError(f"data directory {data_dir} does not exist; create it with `kimbho prepare`")
    if not path.is_file():
        raise KimbhoError(
            f"{data_dir} is not a prepared data directory (no meta.json); create it with `kimbho prepare`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise KimbhoError(f"{path} is corrupt (not valid JSON); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise KimbhoError(f"{path} is not a Kimbho data directory of the kind needed here (format {found!r})")
    return meta


def dataset_fingerprint(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What identifies a prepared dataset's content: per split, its token count and the SHA-256
    of its token ids (computed by `prepare`). Checkpoints store it so resume can refuse other data."""
    return {split: {k: meta["splits"][split][k] for k in ("tokens", "sha256")} for split in SPLITS}


class TokenStream:
    """One split of a prepared data directory as a single read-only sequence of token ids."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train") -> None:
        if split not in SPLITS:
            raise KimbhoError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(data_dir)
        info = self.meta["splits"][split]
        self.split = split
        self.shards = []
        for name in info["shards"]:
            try:
                self.shards.append(np.load(self.data_dir / name, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise KimbhoError(
                    f"shard {self.data_dir / name} is missing or corrupt ({e}); prepare the data again"
                ) from None
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if int(self.offsets[-1]) != info["tokens"]:
            raise KimbhoError(
                f"{self.data_dir}: {split} shards hold {self.offsets[-1]} tokens, meta.json says {info['tokens']}"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return sum(int(shard.nbytes) for shard in self.shards)

    def verify(self, vocab_size: int, check_hash: bool = True) -> None:
        """Refuse shards that do not hold what `prepare` wrote: token ids past `vocab_size` (which
        would fail at the first step, or index garbage), and, with `check_hash`, contents whose
        SHA-256 differs from meta.json's (bit flips that keep ids in range). Streams through the
        memory-mapped shards a block at a time."""
        digest = hashlib.sha256()
        block = 1 << 24  # tokens: 32-64 MiB at a time
        for name, shard in zip(self.meta["splits"][self.split]["shards"], self.shards, strict=True):
            for start in range(0, len(shard), block):
                piece = np.ascontiguousarray(shard[start : start + block])
                top = int(piece.max()) if len(piece) else 0
                if top >= vocab_size:
                    raise KimbhoError(
                        f"shard {self.data_dir / name} holds token id {top}, outside the tokenizer's "
                        f"vocabulary of {vocab_size}: it is corrupt; prepare the data again"
                    )
                if check_hash:
                    digest.update(piece.data)
        if check_hash and digest.hexdigest() != self.meta["splits"][self.split]["sha256"]:
            raise KimbhoError(
                f"the {self.split} shards of {self.data_dir} do not match the SHA-256 in meta.json: a "
                f"shard is corrupt or was changed; prepare the data again (or train.verify_data=false "
                f"to train on it anyway)"
            )

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self.offsets[shard])
            take = min(length, len(self.shards[shard]) - local)
            pieces.append(self.shards[shard][local : local + take])
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])


class TokenDataset(Dataset):
    """The seed README's dataset: non-overlapping windows as `(input_ids, target_ids)` pairs, the
    targets shifted by one token. Use with `DataLoader(dataset, batch_size=32, shuffle=True,
    drop_last=True)`."""

    def __init__(self, data_dir: str | os.PathLike[str], seq_len: int, split: str = "train") -> None:
        self.stream = TokenStream(data_dir, split)
        self.seq_len = seq_len
        if len(self.stream) < seq_len + 1:
            raise KimbhoError(
                f"the {split} split holds {len(self.stream)} tokens, fewer than one window of {seq_len + 1}"
            )

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = torch.from_numpy(self.stream.window(index * self.seq_len, self.seq_len + 1).astype(np.int64))
        return chunk[:-1], chunk[1:]


class RandomWindowSampler:
    """The trainer's batches: windows at random offsets, a pure function of (seed, step).

    Because batch `step` depends on nothing else, resuming at any step reads exactly the batch
    the uninterrupted run would have, and each of N processes can take its own rows of the same
    global batch.

    With a `mixture` (each source's span of the stream and its probability, see `sources.py`),
    each row first draws its source, then a window inside that source's span; without one, a
    window anywhere in the stream: each source as often as its share of the tokens."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        seed: int,
        mixture: Sequence[tuple[SourceSpan, float]] | None = None,
    ) -> None:
        if len(stream) < seq_len + 1:
            raise KimbhoError(
                f"the {stream.split} split holds {len(stream)} tokens, fewer than one sequence of "
                f"train.seq_len + 1 = {seq_len + 1}; use a shorter train.seq_len or more data"
            )
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.mixture = None
        if mixture is not None:
            drawn = [(span, p) for span, p in mixture if p > 0]
            self.mixture = (
                np.array([span.start for span, _ in drawn]),
                np.array([span.tokens - seq_len for span, _ in drawn]),  # window starts per source
                np.array([p for _, p in drawn]),
            )

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        if self.mixture is None:
            return rng.integers(0, len(self.stream) - self.seq_len, size=self.batch_size)
        starts, spans, probs = self.mixture
        source = rng.choice(len(probs), size=self.batch_size, p=probs)
        return starts[source] + rng.integers(0, spans[source])

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        """The given rows of batch `step`: inputs and targets (len(rows), seq_len) int64."""
        windows = np.stack([self.stream.window(int(o), self.seq_len + 1) for o in self.offsets(step)[rows]])
        chunk = torch.from_numpy(windows.astype(np.int64))
        return Batch(chunk[:, :-1], chunk[:, 1:])

    def num_targets(self, step: int) -> int:
        """Targets learnt from in the whole batch `step`: every one."""
        return self.batch_size * self.seq_len

    def state_dict(self, next_step: int) -> dict[str, int]:
        """The sampler's position, for a checkpoint to say: the next batch is `next_step` of
        (seed, batch_size, seq_len). Resuming needs only the step (saved with the progress)."""
        return {
            "next_step": next_step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }


def eval_windows(
    window: Callable[[int, int], np.ndarray], num_tokens: int, seq_len: int, max_tokens: int | None
) -> Iterator[torch.Tensor]:
    """Consecutive windows of up to seq_len + 1 tokens over a sequence of `num_tokens` read through
    `window(start, length)`, each sharing its last token with the next, so every token after the
    first is predicted exactly once. Stops after `max_tokens` predicted tokens (all when None)."""
    total = num_tokens - 1 if max_tokens is None else min(num_tokens - 1, max_tokens)
    for start in range(0, total, seq_len):
        yield torch.from_numpy(window(start, min(seq_len, total - start) + 1).astype(np.int64))
