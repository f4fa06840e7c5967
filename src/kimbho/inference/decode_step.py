"""The decode step: one new token for every slot of the key/value cache, as a plain function of
static-shape tensors, eager or compiled. Compiled, one graph serves every step: on CUDA captured
in a CUDA graph, on the CPU with its few-row matrix products rewritten by `small_matmul`."""

from __future__ import annotations

import functools

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
    next-token logits (S, vocab). Static shapes: this is the function compiled on CUDA."""
    hidden = model.features(tokens[:, None], KVCache(keys, values), positions[:, None], kv_len)
    return model.head(hidden[:, -1])


def compiled_decode_step(cache: KVCache, device: torch.device):
    """`decode_step` compiled with static shapes. On CUDA it is captured in a CUDA graph
    (mode "reduce-overhead": one launch per step instead of hundreds); the cache tensors are
    marked static so the graph may write into them in place."""
    if device.type != "cuda":
        return _cpu_compiled_decode_step()
    torch._dynamo.mark_static_address(cache.keys)
    torch._dynamo.mark_static_address(cache.values)
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return compiled(*args)

    return step


@functools.cache
def _cpu_compiled_decode_step():
    """`decode_step` compiled for the CPU, its few-row matrix products rewritten to read the
    weights at memory speed (see `small_matmul`). One per process: each engine after the first
    reuses the graphs compiled for its shapes."""
    from .small_matmul import SmallMatmulPass  # imports Inductor: only when compiling

    options = {"post_grad_custom_post_pass": SmallMatmulPass()}
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)
