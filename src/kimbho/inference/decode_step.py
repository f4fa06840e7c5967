"""The decode step: one new token for every slot of the key/value cache, as a plain function of
static-shape tensors, eager or compiled. Compiled, one graph serves every step of an engine: on
CUDA `torch.compile`d and captured in a CUDA graph; on the CPU built ahead of time, once per
machine and model shape, with its few-row matrix products rewritten by `small_matmul`
(`decode_package`)."""

from __future__ import annotations

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


class CompiledStep(Protocol):
    """`decode_step` compiled for one engine's cache: `step(tokens, positions, keys, values)` over
    every slot and the whole cache, callable once `ready`."""

    @property
    def ready(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor: ...


def compiled_step(model: KimbhoV1Model, cache: KVCache, device: torch.device, wait: bool) -> CompiledStep:
    """The compiled step for `cache`'s shape. On the CPU, `wait=False` lets it build in the
    background while the engine decodes eager (`decode_package.PackagedStep`)."""
    if device.type == "cpu":
        from .decode_package import PackagedStep

        return PackagedStep(model, cache, wait)
    return _TorchCompiledStep(model, cache)


class _TorchCompiledStep:
    """`decode_step` compiled with static shapes at its first call. On CUDA it is captured in a
    CUDA graph (mode "reduce-overhead": one launch per step instead of hundreds), the cache
    tensors marked static so the graph may write into them in place."""

    ready = True

    def __init__(self, model: KimbhoV1Model, cache: KVCache) -> None:
        self.model, self.kv_len = model, cache.max_len
        self.cuda = cache.keys.device.type == "cuda"
        if self.cuda:
            torch._dynamo.mark_static_address(cache.keys)
            torch._dynamo.mark_static_address(cache.values)
        mode = "reduce-overhead" if self.cuda else None
        self.compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return self.compiled(self.model, tokens, positions, keys, values, self.kv_len)
