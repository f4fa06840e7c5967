"""Held-out loss, perplexity and bits per byte.

Bits per byte (total loss in bits over the UTF-8 bytes of the text it predicts) does not depend
on the tokenizer, so models with different vocabularies can be compared on it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .corpus import CorpusReport, read_sections
from .data import TokenStream, eval_windows, load_meta
from .device import autocast
from .errors import KimbhoError
from .loss import linear_cross_entropy
from .model import KimbhoV1Model
from .tokenizer import Tokenizer


@torch.no_grad()
def sum_loss(
    model: KimbhoV1Model,
    windows: Iterable[torch.Tensor],
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, int]:
    """(total cross-entropy in nats, tokens predicted) over windows of ids (each predicts all but
    its first token). Windows of equal length are batched together."""
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pending: list[torch.Tensor] = []

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal total, count
        chunk = torch.stack(batch).to(device)
        with autocast(device, dtype):
            hidden = model.features(chunk[:, :-1])
            total += linear_cross_entropy(hidden, model.head.weight, chunk[:, 1:], reduction="sum").item()
        count += chunk[:, 1:].numel()

    for window in windows:
        if pending and (len(pending) == batch_size or len(window) != len(pending[0])):
            run(pending)
            pending = []
        pending.append(window)
    if pending:
        run(pending)
    model.train(was_training)
    return total, count


def summarize(total_nats: float, tokens: int, num_bytes: float) -> dict[str, float | int]:
    loss = total_nats / max(1, tokens)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nats / math.log(2) / max(1.0, num_bytes),
        "tokens": tokens,
    }


def evaluate(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    data: str | os.PathLike[str],
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Evaluate on the validation split of a prepared data directory, or on a text file."""
    path = Path(data)
    seq_len = model.config.max_seq_len
    if path.is_dir():
        meta = load_meta(path)
        if meta["tokenizer_sha256"] != tokenizer.sha256:
            raise KimbhoError(
                f"{path} was prepared with a different tokenizer than the model's; prepare it again"
            )
        split = "val" if meta["splits"]["val"]["tokens"] > 1 else "train"
        stream = TokenStream(path, split)
        total, count = sum_loss(
            model, eval_windows(stream.window, len(stream), seq_len, max_tokens), batch_size
        )
        return summarize(total, count, count * stream.bytes_per_token)
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
    total, count = sum_loss(model, windows, batch_size)
    # Bytes of the text actually predicted: every token after the first, up to the limit.
    predicted_bytes = len(tokenizer.decode(ids[1 : count + 1]).encode())
    return summarize(total, count, predicted_bytes)
