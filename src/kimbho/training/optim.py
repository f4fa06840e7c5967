"""Optimizers: AdamW, and Muon for the hidden weight matrices with AdamW for the rest.

`train.optimizer=adamw`: AdamW on every parameter, weight decay on matrices only, PyTorch's fused
kernel where it has one (CUDA and the CPU; faster than the foreach kernel: docs/performance.md).

`train.optimizer=muon`: Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") for the
2-D weights inside the decoder blocks: SGD momentum whose update is orthogonalised by a
Newton–Schulz iteration, so every direction of the matrix moves at the same rate. Embeddings,
the output head and the norm gains are not hidden matrices, and keep AdamW. The update is scaled
by `0.2 * sqrt(max(rows, cols))` so its RMS matches AdamW's (Liu et al. 2025, "Muon is scalable
for LLM training"): both halves share `train.lr` and `train.weight_decay`.

`torch.optim.Muon` exists since PyTorch 2.9 but always runs Newton–Schulz in bf16, which on a
CPU without AMX or AVX512-BF16 is emulated and ~60x slower than fp32. `Muon` here runs it in the dtype `device.py` picks (bf16 where it is
fast, else fp32) and batches the matrices of one shape into one product.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import TrainConfig
from ..device import adamw_fused, pick_precision

if TYPE_CHECKING:
    from ..model import KimbhoV1Model

# Quintic Newton–Schulz coefficients from Jordan's Muon (chosen to maximise the slope at zero, so
# five steps suffice; singular values land near, not at, one, which does not hurt training).
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, orthogonalised by `ns_steps` Newton–Schulz
    steps in `ns_dtype`, decoupled weight decay, update RMS matched to AdamW's."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon takes 2-D weight matrices only, got a parameter of shape {tuple(p.shape)}"
                    )
        # Kept out of the param groups: checkpoints hold plain numbers only.
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum = group["momentum"]
            updates = []
            for p in params:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(momentum).add_(p.grad)
                updates.append(p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf)
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            for shape, indices in by_shape.items():
                stacked = torch.stack([updates[i] for i in indices])  # (k, rows, cols)
                ortho = orthogonalize(stacked, group["ns_steps"], self.ns_dtype)
                scale = 0.2 * math.sqrt(max(shape))
                for i, o in zip(indices, ortho, strict=True):
                    params[i].mul_(1 - group["lr"] * group["weight_decay"])
                    params[i].add_(o.to(params[i].dtype), alpha=-group["lr"] * scale)


def orthogonalize(matrices: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The nearest semi-orthogonal matrices (approximately U V^T of each SVD U S V^T) of a batch
    (k, rows, cols), by a quintic Newton–Schulz iteration in `dtype`."""
    a, b, c = _NS_COEFFICIENTS
    x = matrices.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT  # iterate on the (small x large) side: the Gram matrix is the smaller one
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1].
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT  # (k, small, small)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x if wide else x.mT


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped, zeroed and checkpointed as
    one optimizer. `param_groups` lists both, so a learning-rate schedule sets all of them."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One `torch.optim.Optimizer` state dict: Muon's parameters are numbered first, then
        AdamW's, so tools that read `state`/`param_groups` see one optimizer."""
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        offset = _count_params(muon["param_groups"])
        return {
            "state": {**muon["state"], **{i + offset: s for i, s in adamw["state"].items()}},
            "param_groups": muon["param_groups"] + _shift(adamw["param_groups"], offset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what `state_dict` gave; a ValueError when it belongs to another optimizer."""
        n_muon = len(self.muon.param_groups)
        groups = state["param_groups"]
        offset = _count_params(groups[:n_muon])
        self.muon.load_state_dict(
            {
                "state": {i: s for i, s in state["state"].items() if i < offset},
                "param_groups": groups[:n_muon],
            }
        )
        self.adamw.load_state_dict(
            {
                "state": {i - offset: s for i, s in state["state"].items() if i >= offset},
                "param_groups": _shift(groups[n_muon:], -offset),
            }
        )


def _count_params(groups: list[dict[str, Any]]) -> int:
    return sum(len(g["params"]) for g in groups)


def _shift(groups: list[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
    """Param groups with their parameter numbers moved by `offset`."""
    return [{**g, "params": [i + offset for i in g["params"]]} for g in groups]


Optimizer = torch.optim.Optimizer | MuonWithAdamW


def build_optimizer(model: KimbhoV1Model, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """The optimizer `cfg.optimizer` names, over `model`'s trainable parameters: weight decay on matrices,
    none on gains; for `muon`, Muon on the 2-D weights of `model.blocks` and AdamW on the rest."""
    trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA run's: the adapters
    hidden = (
        {id(p) for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2}
        if cfg.optimizer == "muon"
        else set()
    )
    rest = [p for p in trained if id(p) not in hidden]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=adamw_fused(device),
        foreach=None if adamw_fused(device) else True,
    )
    if cfg.optimizer == "adamw":
        return adamw
    muon = Muon(
        [p for p in trained if id(p) in hidden],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        # Newton–Schulz is matrix products only: in the run's precision (bf16 where auto picks
        # it), so that train.precision=fp32 is fp32 throughout, on every machine.
        ns_dtype=pick_precision(cfg.precision, device),
    )
    return MuonWithAdamW(muon, adamw)
