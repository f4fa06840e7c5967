"""Weight-only int8 quantization for inference (`--dtype int8`).

Each linear layer's weight becomes int8 with one scale per output feature (per channel):
`w ≈ q * scale`, `q = round(w / scale)`, `scale = max|w_row| / 127`. Activations, the embedding
table, the norms and the key/value cache stay in floating point. Decoding one token reads every
weight once, so a quarter of fp32's bytes is the point; per-channel scales keep a trained
model's bits per byte within a fraction of a percent of fp32 (docs/generation.md, Inference
dtypes).

The product is written as dequantize-then-multiply, `linear(x, float(q)) * scale`. In the
compiled decode step Inductor fuses the dequantization into the few-row reduction
(`small_matmul`), so the weights are read as int8 and never stored in float. In eager mode each
call converts the whole matrix to float first (in its stored byte order, the input's columns
permuted to match); that is measured faster on an AVX2 CPU than PyTorch's `_weight_int8pack_mm`
(0.3 against 0.8 ms for one row of a 2048 x 384 matrix, and 5.6 against 237 ms for 256 rows), and
it is what prefill and evaluation use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear


class Int8Linear(nn.Module):
    """A bias-free linear layer of int8 weights, one fp32 scale per output feature (`scales`).

    The int8 matrix (out, in) is stored four values to a 32-bit word, `packed` (out, in/4): byte
    j of word c holds column j * in/4 + c. Unpacked by shifts, `(word << 24 - 8j) >> 24`, it is
    one pointwise expression that Inductor fuses into the compiled decode step's reductions,
    which then read the weights a whole vector of int32 words at a time (in AVX512 and in AVX2
    code alike). An earlier layout kept the words in a float32 tensor, reinterpreted where read:
    Inductor then copies each vector through the stack, 16 scalar moves, and on an Intel Sapphire
    Rapids the int8 `generate` of `small` made 267 tokens/s against 1,263 with int32 words
    (docs/generation.md, Inference dtypes). Being integers, the words keep their dtype through
    `.to(torch.bfloat16)`. `weight` gives the dequantized matrix, for code that reads a linear layer's weight (the
    fused loss of `forward(targets=...)`)."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.in_features = in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers (Kimbho's are all bias-free)")
        w = linear.weight.detach().float()
        # A row of zeros keeps a tiny scale rather than dividing by zero.
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        out, size = q.shape
        q = F.pad(q, (0, -size % 4))  # whole words: zero columns, cut off when unpacked
        words = q.view(out, 4, -1).transpose(1, 2).contiguous().view(torch.int32).view(out, -1)
        return cls(words, scales, size)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def int8_values(self) -> torch.Tensor:
        """The int8 matrix (out, in): in a compiled graph as int32 unpacked by shifts (fused into
        the product that reads it), in eager mode as the int8 bytes reordered (one cheap copy)."""
        out = self.out_features
        if torch.compiler.is_compiling():
            shifts = 24 - 8 * torch.arange(4, dtype=torch.int32, device=self.packed.device)
            words = self.packed[:, None, :]
            unpacked = (words << shifts[None, :, None]) >> 24  # (out, 4, in/4): sign-extended
        else:  # little-endian: byte j of a word is its j-th int8
            unpacked = self.packed.view(torch.int8).view(out, -1, 4).transpose(1, 2)
        return unpacked.reshape(out, -1)[:, : self.in_features]

    @property
    def weight(self) -> torch.Tensor:
        return self.int8_values().to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.int8_values().to(x.dtype)) * self.scales.to(x.dtype)
        # Eager: the bytes in their stored order, which is column 4c + j for column j * in/4 + c,
        # and x's columns permuted to match. One pass over the weights (converting) instead of
        # two (reordering, then converting): 1.7-2.8x faster for a 16-token prompt's rows.
        words = self.packed.shape[1]
        x = F.pad(x, (0, 4 * words - self.in_features))
        x = x.unflatten(-1, (4, words)).transpose(-1, -2).flatten(-2)
        return linear(x, self.packed.view(torch.int8).to(x.dtype)) * self.scales.to(x.dtype)

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
