"""Cross-entropy over the vocabulary, fused with the output projection and computed in chunks.

The logits of a training step are its largest activation: `small` at 16 x 256 tokens and an
8192-token vocabulary has a (4096, 8192) fp32 logits tensor, and the usual
`cross_entropy(head(h))` keeps it, its log-softmax and then its gradient, 134 MB each. Here the
head's product, the loss and the loss's gradient are computed together for one chunk of rows at
a time, while the chunk is still in cache: the gradient of cross-entropy with respect to the
logits is `softmax - one_hot`, so it is known as soon as the forward pass has the softmax, and
the chunk's logits are dropped before the next one (the approach of Liger Kernel's fused linear
cross-entropy). Backward only scales the two stored gradients. `bench/loss_speed.py` measures
the memory and time against `cross_entropy(head(h))` (numbers in docs/performance.md).

Numerically, the logits, log-sum-exp and softmax are always fp32; only the matrix products run
in the autocast dtype (bf16 where it is fast, see `device.py`).
"""

from __future__ import annotations

from typing import Any

import torch

# Rows per chunk: chunk x vocab fp32 logits of about 16 MB stay cache- and allocator-friendly
# (for an 8192-token vocabulary, 512 rows: the fastest of 256..4096 in bench/loss_speed.py).
_CHUNK_ELEMENTS = 1 << 22
# A target of this value predicts nothing: no loss, no gradient (PyTorch's `ignore_index`). The
# fine-tuning data marks the prompt's tokens and the padding of packed rows with it.
IGNORE = -100


# A compiled model forward (`train.compile`) stops at the loss and runs it eager: it computes
# its own gradients, chunk by chunk, and has nothing for Inductor to fuse.
@torch.compiler.disable
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T, targets)` without materialising all the logits.

    hidden (..., D) final hidden states, weight (V, D) the output projection, targets (...) token
    ids, `IGNORE` where nothing is predicted. Matrix products follow the enclosing autocast (bf16
    under `device.autocast`), the softmax is fp32. `reduction` is `mean` (over the targets that
    are not `IGNORE`) or `sum`."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    flat_targets = targets.reshape(-1)  # (N,)
    chunk_rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    # Inside `forward` grad mode is always off, and `needs_input_grad` ignores `torch.no_grad`:
    # ask here, so evaluation does not compute gradients it would throw away.
    grads = torch.is_grad_enabled()
    counted = flat_targets != IGNORE
    masked = not bool(counted.all())  # one check per call; pretraining batches have no IGNORE
    total = _LinearCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk_rows, dtype, grads, masked)
    return total / (counted.sum() if masked else flat_targets.numel()) if reduction == "mean" else total


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`; gradients computed during the forward pass."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int,
        dtype: torch.dtype,
        grads: bool,
        masked: bool,
    ) -> torch.Tensor:
        want_hidden, want_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The casts below are the autocast; running under autocast again would be redundant.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, D)
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, y = hidden[rows].to(dtype), targets[rows]  # (n, D), (n,)
                keep = y != IGNORE if masked else None
                if keep is not None:
                    y = y.clamp_min(0)  # any real id: its term is dropped below
                logits = (h @ w.T).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                losses = lse - logits.gather(1, y[:, None]).squeeze(1)
                total += (losses if keep is None else losses * keep).sum()
                if not (want_hidden or want_weight):
                    continue
                # d(loss)/d(logits) = softmax - one_hot(target), computed in place in the logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                if keep is not None:
                    grad_logits *= keep[:, None]
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w  # (n, D)
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)  # (V, D), accumulated in place
                elif grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
            None,
            None,
            None,
        )
