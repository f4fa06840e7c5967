"""The model's linear layer: `nn.Linear`, whose products outside autograd on the CPU run in oneDNN.

Eager PyTorch gives an fp32 matrix product on the CPU to MKL. On AMD CPUs MKL is known to take
slower code paths than on Intel's, and oneDNN, which ships inside PyTorch and picks its kernels
by instruction set, was faster at every size measured on a 2-core AMD EPYC Zen 5: 1 x 384 by
384 x 8192 (the `small` head, one token) 300 against 137 us, 16 x 384 by 384 x 2048 302 against
196 us, 256 rows 3.1 against 1.2 ms; a 16-token prefill of `small` 8.0 against 5.6 ms
(docs/generation.md, Decode speed). So `linear` sends fp32 CPU products that autograd does not
record (prefill, evaluation, eager decoding) to oneDNN, on the weights as they are (no packed
copy, no memory added); the results differ from MKL's in the order of summation only. Training
keeps `F.linear` and its backward, autocast regions keep it (it casts to bf16 there), and so does
anything being compiled: the compiled decode step rewrites the `mm` that F.linear lowers to
(`inference/small_matmul.py`).

bf16 weights on a CPU without native bf16 (AVX2 only: PyTorch emulates the product) are
multiplied the same way, in fp32: the weights and rows converted (exactly), summed in fp32 as a
native bf16 product sums, the result rounded to bf16. On a Zen 3 a 16-token prefill of `small`
in bf16 took 20.4 ms with emulated products against 11.9 ms so, a 256-token one 271 against 57 ms.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..device import fast_bf16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, in oneDNN where that is faster (see the module docstring)."""
    if x.dtype == weight.dtype == torch.bfloat16 and _inference_on_cpu(x, weight) and not fast_bf16(x.device):
        bias = bias.float() if bias is not None else None
        return _onednn_linear(x.float(), weight.float(), bias).to(torch.bfloat16)
    if x.dtype == weight.dtype == torch.float32 and _inference_on_cpu(x, weight):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _inference_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU product that autograd does not record, outside autocast and compiling, of plain
    tensors, where this PyTorch has oneDNN's linear."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # there F.linear runs in bf16: autocast decides
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor, a fake or meta tensor
        and type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and _onednn_available()
    )


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def _onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear, checked once against F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # Fixed values: drawing random ones would move the caller's random stream (a resumed
        # run's dropout and samples would then differ from the uninterrupted run's).
        x, w = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(1, -1, 40).view(5, 8)
        with torch.autocast("cpu", enabled=False):  # it may be first called inside autocast
            return torch.allclose(_onednn_linear(x, w, None), F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):
        return False
