"""Writing prepared data: read the inputs, tokenize them in batches, cut a validation split of
whole documents, and write token shards and meta.json (see `shards` for reading them)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import KimbhoError
from ..storage.staging import check_directory_free, staged_directory
from .corpus import (
    DEFAULT_CORPUS,
    CorpusReport,
    Section,
    default_corpus_sections,
    read_sections,
    resolve_inputs,
)
from .shards import SPLITS, TOKENS_FORMAT
from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")

DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard buffer


_ENCODE_BATCH_BYTES = 4 * 1024 * 1024


class CorpusSource:
    """Where the text comes from: input paths, or the built-in default corpus when there are none.
    It can be read more than once (tokenizer training, then tokenization)."""

    def __init__(self, inputs: list[str] | None, text_field: str = "text") -> None:
        self.files = resolve_inputs(inputs) if inputs else None
        self.text_field = text_field

    def sections(self, report: CorpusReport | None = None) -> Iterator[Section]:
        report = report if report is not None else CorpusReport()
        if self.files is None:
            return default_corpus_sections(report)
        return read_sections(self.files, self.text_field, report)

    def texts(self) -> Iterator[str]:
        return (s.text for s in self.sections())

    @property
    def total_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.files is not None else None

    @property
    def names(self) -> list[str]:
        return [str(f) for f in self.files] if self.files is not None else [DEFAULT_CORPUS]


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
        tokenizer = Tokenizer.train(source.texts(), vocab_size)
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
    index = 0  # section number, decides the split
    progress = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)

    document_has_text = False  # an empty document gets no end-of-text token of its own

    def flush(batch: list[Section]) -> None:
        nonlocal index, document_has_text
        for section, ids in zip(batch, tokenizer.encode_batch([s.text for s in batch]), strict=True):
            document_has_text |= bool(ids)
            if not ids and not (section.end_of_document and document_has_text):
                continue
            if section.end_of_document:
                document_has_text = False
            # Systematic sampling: section i is validation when (i + 1/2) * val_fraction crosses an
            # integer, so sections 1/(2f), 3/(2f), ... are held out: spread out, exactly a share f.
            split = (
                "val"
                if math.floor((index + 1) * val_fraction + 0.5) > math.floor(index * val_fraction + 0.5)
                else "train"
            )
            index += 1
            num_bytes = len(section.text.encode())
            writers[split].write(ids, num_bytes, eot if section.end_of_document else None)
            progress.update(num_bytes)

    batch: list[Section] = []
    size = 0
    for section in source.sections(report):
        batch.append(section)
        size += len(section.text)
        if size >= _ENCODE_BATCH_BYTES:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    progress.close()

    if writers["train"].tokens + writers["val"].tokens == 0:
        raise KimbhoError("the corpus is empty: no text was found in the inputs")
    if val_fraction > 0 and writers["val"].tokens == 0:
        raise KimbhoError(
            f"the corpus is too small to hold out {val_fraction:.0%} for validation "
            f"({index} section(s) of ~32 KiB); add text or pass --val-fraction 0"
        )
    splits = {split: writer.close() for split, writer in writers.items()}
    return {
        "format": TOKENS_FORMAT,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "eot_id": eot,
        "pad_id": tokenizer.pad_id,
        "val_fraction": val_fraction,
        "splits": splits,
        "sources": source.names,
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

    def write(self, ids: list[int], num_bytes: int, eot: int | None) -> None:
        array: np.ndarray = np.asarray(ids + ([eot] if eot is not None else []), dtype=self.dtype)
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
