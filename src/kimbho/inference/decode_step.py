"""The decode step: one new token for every slot of the key/value cache, as a plain function of
static-shape tensors, eager or compiled. Compiled, one graph serves every step of an engine: on
CUDA `torch.compile`d and captured in a CUDA graph; on the CPU built ahead of time, once per
machine and model shape, with its few-row matrix products rewritten by `small_matmul`
(`decode_package`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..model import KimbhoV1Model, KVCache


def decode_step(
    model: KimbhoV1Model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """One token per slot: `tokens` (S,) at `positions` (S,) into the cache (keys, values)
    (num_blocks, S, n_kv, max_len, hd), attending to the first `kv_len` positions. Returns the
    next-token logits (S, vocab). Static shapes: this is the function that is compiled."""
    hidden = model.features(tokens[:, None], KVCache(keys, values), positions[:, None], kv_len)
    return model.head(hidden[:, -1])


# A compiled step: (tokens, positions, keys, values) of some leading slots, the keys and values
# cut to some leading positions -> their logits.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CompiledSteps(Protocol):
    """`decode_step` compiled for one engine's cache, per bucket of leading slots (the rows a
    step covers), each over some leading positions of the cache (the length it attends to)."""

    @property
    def ready(self) -> bool:
        """Whether every bucket's step can be called without compiling."""

    def step_for(self, rows: int, length: int) -> tuple[int, int, Step] | None:
        """For a step of `rows` slots whose positions are below `length`: the smallest ready
        bucket of at least that many slots, the length it attends to (at least `length`), and its
        step; None: decode eager."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `ready` (or `timeout` seconds pass, or a build fails); whether it is."""


def compiled_steps(model: KimbhoV1Model, cache: KVCache, device: torch.device, wait: bool) -> CompiledSteps:
    """The compiled steps for `cache`. On the CPU one package per bucket of 1, 2, 4, ... slots
    and all of them, each for any length, built in the background while the engine decodes eager
    unless `wait` (`decode_package.PackagedSteps`); elsewhere one step over every slot and the
    whole cache, compiled at its first call."""
    if device.type == "cpu":
        from .decode_package import PackagedSteps

        buckets = sorted(
            {*(1 << i for i in range(cache.slots.bit_length()) if 1 << i < cache.slots), cache.slots}
        )
        return PackagedSteps(model, cache, buckets, wait)
    return _TorchCompiledStep(model, cache)


class _TorchCompiledStep:
    """`decode_step` over every slot, compiled with static shapes at its first call. On CUDA it
    is captured in a CUDA graph (mode "reduce-overhead": one launch per step instead of
    hundreds), the cache tensors marked static so the graph may write into them in place (one
    bucket only: a view of the cache would be copied into the graph's own buffers, not written)."""

    ready = True

    def __init__(self, model: KimbhoV1Model, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.cuda = cache.keys.device.type == "cuda"
        if self.cuda:
            torch._dynamo.mark_static_address(cache.keys)
            torch._dynamo.mark_static_address(cache.values)
        mode = "reduce-overhead" if self.cuda else None
        self.compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)

    def step_for(self, rows: int, length: int) -> tuple[int, int, Step]:
        return self.cache.slots, self.cache.max_len, self._step

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        if not self.cuda:
            return self.compiled(self.model, tokens, positions, keys, values, self.cache.max_len)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        # A copy: the graph writes the next step's logits into the same buffer.
        return self.compiled(self.model, tokens, positions, keys, values, self.cache.max_len).clone()
