"""Choosing the next token: small pure functions over a (B, vocab) logits tensor.

Order of application, as in Hugging Face and llama.cpp: repetition penalty, temperature, then
the truncations (top-k, top-p, min-p), then a draw. Temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import KimbhoError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise KimbhoError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise KimbhoError(f"top_k must be >= 0 (0 or None: off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise KimbhoError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise KimbhoError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise KimbhoError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): logits of tokens already in `seen` (B, N) are divided
    by `penalty` when positive and multiplied by it when negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row; the rest become -inf."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose probability
    mass reaches p (always at least the most likely token)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # A token is dropped when the mass before it already reaches p.
    drop = (cumulative - sorted_logits.softmax(-1)) >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens less likely than min_p times the most
    likely one."""
    if not min_p:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id of each row, (B,), from last-position logits (B, vocab)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
