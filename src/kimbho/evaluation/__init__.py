"""Held-out loss, perplexity and bits per byte.

Bits per byte (total loss in bits over the UTF-8 bytes of the text it predicts) does not depend
on the tokenizer, so models with different vocabularies can be compared on it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.corpus import CorpusReport, read_sections
from ..data.shards import Batch, TokenStream, eval_windows, load_meta, window_batches
from ..data.sources import SourceSpan, shares, source_spans
from ..data.tokenizer import Tokenizer
from ..device import autocast
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from ..model.loss import IGNORE


@torch.no_grad()
def sum_loss(
    model: KimbhoV1Model,
    batches: Iterable[Batch],
    tokenizer: Tokenizer,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, int, int]:
    """(total cross-entropy in nats, tokens predicted, UTF-8 bytes of the predicted tokens) over
    batches (`window_batches` for plain text; packed rows count their learnt targets only)."""
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    total, count, num_bytes = 0.0, 0, 0
    for batch in batches:
        targets = batch.targets.reshape(-1)
        counted = targets[targets != IGNORE]
        num_bytes += tokenizer.count_bytes(counted.numpy())
        count += len(counted)
        with autocast(device, dtype):
            total += batch.to(device).loss(model, reduction="sum").item()
    model.train(was_training)
    return total, count, num_bytes


def summarize(total_nats: float, tokens: int, num_bytes: int) -> dict[str, float | int]:
    """Loss, perplexity and bits per byte of `tokens` predicted tokens that stand for `num_bytes`
    bytes of text. No tokens is an error, not a perfect score."""
    if tokens < 1:
        raise KimbhoError("nothing was evaluated (0 tokens); evaluate at least one token")
    loss = total_nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nats / math.log(2) / max(1, num_bytes),
        "tokens": tokens,
        "bytes": num_bytes,
    }


def source_windows(
    stream: TokenStream, spans: Mapping[str, SourceSpan] | None, seq_len: int, max_tokens: int | None
) -> dict[str, Iterator[torch.Tensor]]:
    """Consecutive windows (`eval_windows`) over each source's span of `stream`, never across two
    sources, `max_tokens` split between them as evenly as their sizes allow (`shares`). Data
    prepared before sources were named is one source, named ""."""
    spans = spans if spans is not None else {"": SourceSpan(0, len(stream), 0, 0)}
    usable = {name: span for name, span in spans.items() if span.tokens > 1}
    budgets = shares({name: span.tokens - 1 for name, span in usable.items()}, max_tokens)

    def window(span: SourceSpan) -> Callable[[int, int], np.ndarray]:
        return lambda start, length: stream.window(span.start + start, length)

    return {
        name: eval_windows(window(span), span.tokens, seq_len, budgets[name])
        for name, span in usable.items()
        if budgets[name] > 0  # a budget smaller than the number of sources leaves some out
    }


def summarize_sources(per_source: Mapping[str, tuple[float, int, int]]) -> dict[str, Any]:
    """`summarize` over all sources' (nats, tokens, bytes) together and, when there are several,
    `by_source`: each one's `val_loss`, `val_bpb` and `tokens` (the keys of metrics.jsonl's eval
    records). One source adds nothing to the overall numbers, so its records read as before."""
    nats = sum(n for n, _, _ in per_source.values())
    tokens = sum(t for _, t, _ in per_source.values())
    num_bytes = sum(b for _, _, b in per_source.values())
    result: dict[str, Any] = summarize(nats, tokens, num_bytes)  # nothing at all is an error
    if len(per_source) > 1:
        result["by_source"] = {}
        for name, (n, t, b) in per_source.items():
            one = summarize(n, t, b)
            result["by_source"][name] = {
                "val_loss": one["loss"],
                "val_bpb": one["bits_per_byte"],
                "tokens": t,
            }
    return result


def evaluate(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    data: str | os.PathLike[str],
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Evaluate on the validation split of a prepared data directory (each named source's too,
    under `by_source`), or on a text file. Bits per byte count the exact bytes of the predicted
    tokens in both (`Tokenizer.count_bytes`)."""
    if max_tokens is not None and max_tokens < 1:
        raise KimbhoError(f"max_tokens must be at least 1 (or unset: everything), got {max_tokens}")
    path = Path(data)
    seq_len = model.config.max_seq_len
    if path.is_dir():
        meta = load_meta(path)
        if meta["tokenizer_sha256"] != tokenizer.sha256:
            raise KimbhoError(
                f"{path} was prepared with a different tokenizer than the model's; prepare it again"
            )
        if meta["splits"]["val"]["tokens"] < 2:
            raise KimbhoError(
                f"{path} has no validation split to evaluate on; prepare it with --val-fraction above 0, "
                f"or evaluate on a held-out text file"
            )
        stream = TokenStream(path, "val")
        sources = source_windows(stream, source_spans(meta, "val"), seq_len, max_tokens)
        return summarize_sources(
            {name: sum_loss(model, window_batches(w, batch_size), tokenizer) for name, w in sources.items()}
        )
    if not path.is_file():
        raise KimbhoError(
            f"evaluation data {data} does not exist (give a prepared data directory or a text file)"
        )
    report = CorpusReport()
    ids: list[int] = []
    for section in read_sections([path], "text", report):
        ids.extend(tokenizer.encode(section.text))
    if report.skipped_binary:
        raise KimbhoError(f"{path} is a binary file, not text")
    if len(ids) < 2:
        raise KimbhoError(f"{path} holds too little text to evaluate (needs at least 2 tokens)")
    array = np.asarray(ids, dtype=np.int64)
    windows = eval_windows(
        lambda start, length: array[start : start + length], len(array), seq_len, max_tokens
    )
    return summarize(*sum_loss(model, window_batches(windows, batch_size), tokenizer))


def unigram_bpb(data_dir: Path) -> float:
    """Bits per byte on the validation split of a unigram model fit to the training split
    (token frequencies with add-one smoothing): the baseline a language model has to beat."""
    train, val = TokenStream(data_dir, "train"), TokenStream(data_dir, "val")
    vocab = train.meta["vocab_size"]
    counts = np.bincount(train.window(0, len(train)), minlength=vocab).astype(np.float64) + 1.0
    log_probs = np.log2(counts / counts.sum())
    val_ids = val.window(0, len(val))
    bits = -log_probs[val_ids[1:]].sum()  # the same tokens the model is scored on
    tokenizer = Tokenizer.from_file(Path(data_dir) / "tokenizer.json")
    return float(bits / tokenizer.count_bytes(val_ids[1:]))
