"""Prompt passes on the CPU with oneDNN's matrix product instead of MKL's.

A prefill multiplies a few to a few hundred rows by every weight matrix: a real matrix product,
which eager PyTorch gives to MKL. On AMD CPUs MKL is known to take slower code paths than on
Intel's, and oneDNN, which ships inside PyTorch and picks its kernels by instruction set, was
faster at every size measured: on a 2-core AMD EPYC Zen 5, 16 x 384 by 384 x 2048 took 302 us in
MKL and 196 us in oneDNN, 256 rows 3.1 against 1.2 ms (docs/generation.md, Decode speed). The
weights stay as they are (no packed copy, no memory added); the results differ from MKL's in the
order of summation only (~1e-6 on the logits).

`onednn_linears` routes `F.linear` to oneDNN for fp32 tensors on the CPU while it is entered,
outside autograd; every other call and dtype (bf16 already goes to oneDNN) runs as before. The
engine enters it around a prefill of enough rows. The decode step does not need it: its few-row
products are compiled (`small_matmul`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The mode sees every torch call of the pass (~500 in a prefill of `small`), at a few
# microseconds each: from about this many rows oneDNN's gain is larger (a prefill of `small` on
# the Zen 5 above: 16 rows 8.5 ms either way, 32 rows 11.8 -> 9.6 ms, 64 17.5 -> 11.1, 256 40 -> 24).
FROM_ROWS = 32


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear, checked once against F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.randn(3, 8), torch.randn(5, 8)
        return torch.allclose(_linear(x, w, None), F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinears(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.dtype == weight.dtype == torch.float32
                and x.device.type == "cpu"
                and weight.layout == torch.strided
            ):
                return _linear(x, weight, bias)
        return func(*args, **kwargs)


def onednn_linears(device: torch.device, rows: int) -> AbstractContextManager[Any]:
    """A context in which fp32 CPU `F.linear` calls outside autograd run in oneDNN (see the module
    docstring), for a pass over `rows` rows in all; one that does nothing off the CPU, below
    `FROM_ROWS` or where this PyTorch has no oneDNN."""
    wanted = device.type == "cpu" and rows >= FROM_ROWS
    return _OneDNNLinears() if wanted and available() else nullcontext()
