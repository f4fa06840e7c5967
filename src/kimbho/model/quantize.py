"""Weight-only int8 quantization for inference (`--dtype int8`).

Each linear layer's weight becomes int8 with one scale per output feature (per channel):
`w ≈ q * scale`, `q = round(w / scale)`, `scale = max|w_row| / 127`. Activations, the embedding
table, the norms and the key/value cache stay in floating point. Decoding one token reads every
weight once, so a quarter of fp32's bytes is the point; per-channel scales keep a trained
model's bits per byte within a fraction of a percent of fp32 (docs/generation.md, Inference
dtypes).

The module computes `linear(x, float(q)) * scale`, plain PyTorch: in eager mode (prefill,
evaluation) each call converts the matrix to float and multiplies it in oneDNN (`linear`); that
is measured faster on an AVX2 CPU than PyTorch's `_weight_int8pack_mm` (0.3 against 0.8 ms for
one row of a 2048 x 384 matrix, 5.6 against 237 ms for 256 rows). The CPU's compiled decode step
replaces the product by Kimbho's int8 kernel, which reads the int8 matrix as it is stored
(`inference/small_matmul.py`, `inference/cpu_kernels.cpp`).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import linear


class Int8Linear(nn.Module):
    """A bias-free linear layer of int8 weights `qweight` (out, in), one fp32 scale per output
    feature (`scales`). Being integers, they keep their dtype through `.to(torch.bfloat16)`.
    `weight` gives the dequantized matrix, for code that reads a linear layer's weight (the fused
    loss of `forward(targets=...)`)."""

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
        # A row of zeros keeps a tiny scale rather than dividing by zero.
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)

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
