"""LoRA (Hu et al., 2021): a frozen model plus trainable low-rank updates of its projections.

Each projection `W` (out x in) gains `scale * B @ A`, with `A` (rank x in) random and `B`
(out x rank) zero, so a model with fresh adapters computes exactly what its base does. The
fused projections hold one adapter per part, as if they were separate matrices: `attn.qkv` has
its own for query, key and value (the key and value ones narrower under grouped-query attention),
`mlp.gate_up` for gate and up. That is what a Hugging Face Llama with PEFT adapters on `q_proj`,
`k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj` computes (`interop/hf.py`).

The parts' `A` matrices are stacked (one matrix product for all of them) and so are their `B`
matrices along the output, in the fused matrix's order: `blocks.{i}.attn.qkv.lora_A` is
(3 * rank, emb_dim), `blocks.{i}.attn.qkv.lora_B` is (q + k + v rows, rank). The base weights
keep their names, so a LoRA model's state dict is its base's plus the `lora_` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .transformer import Block, KimbhoV1Model

ADAPTER_MARK = ".lora_"  # in the name of every adapter tensor, and of no base tensor


class LoraLinear(nn.Linear):
    """A frozen projection plus `scale * B_i @ A_i` on each part `i` of its output rows."""

    def __init__(self, base: nn.Linear, parts: Sequence[int], rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        assert sum(parts) == base.out_features and base.bias is None
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same parameter: its name and value stay the base's
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.parts: tuple[int, ...] = tuple(parts)
        self.rank: int = rank
        self.scale: float = alpha / rank
        device = base.weight.device
        self.lora_A: nn.Parameter = nn.Parameter(
            torch.empty(len(parts) * rank, base.in_features, device=device)
        )
        self.lora_B: nn.Parameter = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        for a in self.lora_A.data.split(rank):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT initialises A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = F.linear(x, self.lora_A) * self.scale  # (..., parts * rank)
        if len(self.parts) == 1:
            up = F.linear(down, self.lora_B)
        else:
            up = torch.cat(
                [
                    F.linear(h, b)
                    for h, b in zip(down.split(self.rank, -1), self.lora_B.split(self.parts), strict=True)
                ],
                dim=-1,
            )
        weight = self.weight
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)  # a bf16-stored base outside autocast (sampling)
        return F.linear(x, weight) + up

    def merged_weight(self) -> torch.Tensor:
        """`W + scale * B @ A`, part by part: the one matrix that computes what this module does."""
        delta = torch.cat(
            [b @ a for a, b in zip(self.lora_A.split(self.rank), self.lora_B.split(self.parts), strict=True)]
        )
        return (self.weight.float() + self.scale * delta.float()).to(self.weight.dtype)


def _projections(model: KimbhoV1Model) -> list[tuple[nn.Module, str, list[int]]]:
    """(parent module, attribute, output parts) of every projection that gets an adapter."""
    config = model.config
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    assert config.mlp_hidden is not None
    found: list[tuple[nn.Module, str, list[int]]] = []
    for block in cast(list[Block], model.blocks):
        found += [
            (block.attn, "qkv", [q, kv, kv]),
            (block.attn, "out", [config.emb_dim]),
            (block.mlp, "gate_up", [config.mlp_hidden, config.mlp_hidden]),
            (block.mlp, "down", [config.emb_dim]),
        ]
    return found


def add_adapters(
    model: KimbhoV1Model, rank: int, alpha: float, frozen_dtype: torch.dtype | None = None
) -> None:
    """Freeze every parameter of `model` and give its projections fresh adapters (drawn from
    torch's global generator: seed it first for the same adapters on every process).
    `frozen_dtype` stores the adapted projections' frozen weights in that precision; the
    adapters, which train, stay fp32."""
    for param in model.parameters():
        param.requires_grad_(False)
    for parent, name, parts in _projections(model):
        adapted = LoraLinear(getattr(parent, name), parts, rank, alpha)
        if frozen_dtype is not None:
            adapted.weight.data = adapted.weight.data.to(frozen_dtype)
        setattr(parent, name, adapted)


def merge_adapters(model: KimbhoV1Model) -> None:
    """Fold every adapter into its projection, leaving a plain model that computes the same."""
    for parent, name, _ in _projections(model):
        module = getattr(parent, name)
        if isinstance(module, LoraLinear):
            merged = Linear(module.in_features, module.out_features, bias=False, device="meta")
            merged.weight = nn.Parameter(module.merged_weight().detach(), requires_grad=False)
            setattr(parent, name, merged)


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA model's state dict."""
    return {name: t for name, t in state.items() if is_adapter(name)}
