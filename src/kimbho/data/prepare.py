"""Writing prepared data: read the inputs, tokenize them in batches, cut a validation split of
whole documents, and write token shards and meta.json (see `shards` for reading them)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import KimbhoError
from ..storage.staging import check_directory_free, staged_directory
from .corpus import CorpusReport, Section
from .shards import SPLITS, TOKENS_FORMAT
from .sources import CorpusSource, poor_fits
from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")

DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard buffer


def prepare(
    inputs: list[str] | None,
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` (or the default corpus when None/empty) into `out_dir`; returns meta.json's
    content. Give a tokenizer, or a `vocab_size` to train one on the same text first."""
    out = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise KimbhoError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if (tokenizer is None) == (vocab_size is None):
        raise KimbhoError(
            "give either a tokenizer (--tokenizer tokenizer.json) or a vocabulary size (--vocab-size N)"
        )
    check_directory_free(out, force)  # before the work
    source = CorpusSource(inputs, text_field)
    if tokenizer is None:
        assert vocab_size is not None
        log.info(f"training a {vocab_size}-token byte-level BPE tokenizer")
        tokenizer = Tokenizer.train(source.balanced_texts(), vocab_size)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(tokenizer)
    if tokenizer.eot_id is None:
        raise KimbhoError("the tokenizer has no end-of-text token (<|endoftext|>) to separate documents")

    with staged_directory(out, force) as tmp:  # the old data stays whole until the new one is
        meta = _write_shards(source, tokenizer, tmp, val_fraction, shard_tokens)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _write_shards(
    source: CorpusSource, tokenizer: Tokenizer, out: Path, val_fraction: float, shard_tokens: int
) -> dict[str, Any]:
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    report = CorpusReport()
    eot = tokenizer.eot_id
    assert eot is not None
    index: dict[str, int] = {}  # sections seen per source: decides the split
    progress = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)

    document_has_text = False  # an empty document gets no end-of-text token of its own

    def flush(batch: list[tuple[str, Section]]) -> None:
        nonlocal document_has_text
        encoded = tokenizer.encode_batch([s.text for _, s in batch])
        for (name, section), ids in zip(batch, encoded, strict=True):
            document_has_text |= bool(ids)
            if not ids and not (section.end_of_document and document_has_text):
                continue
            if section.end_of_document:
                document_has_text = False
            # Systematic sampling, per source so that each gets its share: section i is validation
            # when (i + 1/2) * val_fraction crosses an integer, so sections 1/(2f), 3/(2f), ... are
            # held out: spread out, exactly a share f.
            i = index[name] = index.get(name, -1) + 1
            split = (
                "val"
                if math.floor((i + 1) * val_fraction + 0.5) > math.floor(i * val_fraction + 0.5)
                else "train"
            )
            num_bytes = len(section.text.encode())
            writers[split].write(name, ids, num_bytes, eot if section.end_of_document else None)
            progress.update(num_bytes)

    for batch in source.batches(report):
        flush(batch)
    progress.close()

    if writers["train"].tokens + writers["val"].tokens == 0:
        raise KimbhoError("the corpus is empty: no text was found in the inputs")
    if val_fraction > 0 and writers["val"].tokens == 0:
        raise KimbhoError(
            f"the corpus is too small to hold out {val_fraction:.0%} for validation "
            f"({sum(index.values())} section(s) of ~32 KiB); add text or pass --val-fraction 0"
        )
    splits = {split: writer.close() for split, writer in writers.items()}
    sources: dict[str, dict[str, Any]] = {
        name: {"inputs": inputs} for name, inputs in source.inputs().items()
    }
    for split, writer in writers.items():
        for name in sources:
            sources[name][split] = writer.spans.get(name) or {
                "start": writer.tokens, "tokens": 0, "bytes": 0, "documents": 0,
            }  # fmt: skip
    for name in sources:
        if val_fraction > 0 and sources[name]["val"]["tokens"] == 0:
            log.warning(
                f"source {name!r} is too small to hold out {val_fraction:.0%} of it for validation "
                f"(fewer than {math.ceil(0.5 / val_fraction)} sections of ~32 KiB): it has no validation "
                f"score of its own"
            )
    for warning in poor_fits({n: (s["train"]["bytes"], s["train"]["tokens"]) for n, s in sources.items()}):
        log.warning(warning)
    return {
        "format": TOKENS_FORMAT,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "eot_id": eot,
        "pad_id": tokenizer.pad_id,
        "val_fraction": val_fraction,
        "splits": splits,
        "sources": sources,
        "report": asdict(report),
    }


class _ShardWriter:
    """Fills a fixed-size buffer and writes it out as numbered .npy shards."""

    def __init__(self, out: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.out, self.split, self.dtype = out, split, dtype
        self.buffer: np.ndarray = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self.digest = hashlib.sha256()
        # Each source's run of this split (sources arrive one after another): `sources.SourceSpan`.
        self.spans: dict[str, dict[str, int]] = {}

    def write(self, source: str, ids: list[int], num_bytes: int, eot: int | None) -> None:
        array: np.ndarray = np.asarray(ids + ([eot] if eot is not None else []), dtype=self.dtype)
        span = self.spans.setdefault(source, {"start": self.tokens, "tokens": 0, "bytes": 0, "documents": 0})
        assert span["start"] + span["tokens"] == self.tokens, "a source's sections must arrive together"
        span["tokens"] += len(array)
        span["bytes"] += num_bytes
        span["documents"] += eot is not None
        self.tokens += len(array)
        self.bytes += num_bytes
        self.documents += eot is not None
        while len(array):
            take = min(len(array), len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + take] = array[:take]
            self.fill += take
            array = array[take:]
            if self.fill == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.split}-{len(self.shards):05d}.npy"
        data = self.buffer[: self.fill]
        np.save(self.out / name, data)
        self.digest.update(data.data)  # a view: no copy of the (up to 256 MiB) buffer
        self.shards.append(name)
        self.fill = 0

    def close(self) -> dict[str, Any]:
        self._flush()
        return {
            "shards": self.shards,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
        }
