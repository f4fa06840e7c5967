"""Weight-only int8 quantization for inference (`--dtype int8`).

Each linear layer's weight becomes int8 with one scale per output feature (per channel):
`w ≈ q * scale`, `q = round(w / scale)`, `scale = max|w_row| / 127`. Activations, the embedding
table, the norms and the key/value cache stay in floating point. Decoding one token reads every
weight once, so a quarter of fp32's bytes is the point; per-channel scales keep a trained
model's bits per byte within a fraction of a percent of fp32 (docs/generation.md, Inference
dtypes).

The product is written as dequantize-then-multiply, `linear(x, q.to(x.dtype)) * scale`. In the
compiled decode step Inductor fuses the conversion into the few-row reduction (`small_matmul`),
so the weights are read as int8 and never stored in float. In eager mode each call converts the
whole matrix first; that is measured faster on an AVX2 CPU than PyTorch's
`_weight_int8pack_mm` (0.6 against 0.7 ms for one row of a 2048 x 384 matrix, and 6.5 against
300 ms for 256 rows), and it is what prefill and evaluation use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """A bias-free linear layer of int8 weights `qweight` (out, in) and fp32 `scales` (out,).
    `weight` gives the dequantized matrix, for code that reads a linear layer's weight (the
    fused loss of `forward(targets=...)`)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers (Kimbho's are all bias-free)")
        w = linear.weight.detach().float()
        # A row of zeros keeps scale 1 rather than dividing by zero.
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (attention and MLP projections, the head) by an
    `Int8Linear`, in place; returns `model`. A head tied to the embedding gets its own int8
    copy, and the embedding table stays in floating point (a lookup reads one row a token)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
