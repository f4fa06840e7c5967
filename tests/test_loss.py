import pytest
import torch
import torch.nn.functional as F

from kimbho.model import loss as loss_module
from kimbho.model.loss import linear_cross_entropy


def _inputs(
    rows: int = 300, dim: int = 24, vocab: int = 97
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(3, rows // 3, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (3, rows // 3))
    return hidden, weight, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_cross_entropy_of_the_full_logits(reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Value and both gradients match `cross_entropy(hidden @ weight.T)`, across chunk edges."""
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 97 * 64)  # 64-row chunks: 5 chunks, the last partial
    hidden, weight, targets = _inputs()
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction=reduction)
    expected_grads = torch.autograd.grad(expected * 3, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    got_grads = torch.autograd.grad(got * 3, (hidden, weight))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_targets_count_for_nothing(reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets of IGNORE (-100) add no loss and no gradient, as in `cross_entropy(ignore_index=-100)`;
    the mean is over the other targets."""
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 97 * 64)
    hidden, weight, targets = _inputs()
    targets = targets.clone()
    targets[0, :40] = loss_module.IGNORE  # a whole chunk and part of the next
    targets[2, ::3] = loss_module.IGNORE
    expected = F.cross_entropy(
        (hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=-100
    )
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert got_grads[0][0, :40].abs().max() == 0  # nothing flows back from an ignored position


def test_without_gradients_it_only_computes_the_loss() -> None:
    """Under `no_grad` (evaluation) only the head's product runs, not the two gradient products."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, targets = _inputs()
    head_flops = 2 * hidden.shape[0] * hidden.shape[1] * hidden.shape[2] * weight.shape[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        got = linear_cross_entropy(hidden, weight, targets, reduction="sum")
    assert counter.get_total_flops() == head_flops
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(hidden, weight, targets, reduction="sum")
    # Training adds the gradients' products (the in-place addmm_ of the weight's is not counted).
    assert counter.get_total_flops() >= 2 * head_flops
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="sum")
    assert not got.requires_grad
    torch.testing.assert_close(got, expected)


def test_bf16_autocast_stays_close_and_gradients_stay_fp32() -> None:
    hidden, weight, targets = _inputs()
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets)
    got.backward()
    assert got.dtype == torch.float32 and weight.grad is not None and weight.grad.dtype == torch.float32
    assert abs(got.item() - expected.item()) < 0.01 * expected.item()


def test_unknown_reduction_is_refused() -> None:
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
