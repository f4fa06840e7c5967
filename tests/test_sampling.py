import pytest
import torch

from kimbho.errors import KimbhoError
from kimbho.inference.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    draw,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
)


def test_filters_are_pure_and_correct() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    original = logits.clone()
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [True, True, False, False, False]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, None), logits)
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() >= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True, False, False, False, False]
    assert torch.isfinite(min_p_filter(logits, 0.2))[0].tolist() == [True, True, False, False, False]
    assert torch.equal(logits, original)


def test_top_p_keeps_the_best_token_even_for_tiny_p() -> None:
    logits = torch.tensor([[0.0, 0.0, 5.0]])
    assert torch.isfinite(top_p_filter(logits, 1e-6))[0].tolist() == [False, False, True]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_same_tokens_as_sorting_with_the_permutation(p: float) -> None:
    """The cut-off probability found from sorted values alone keeps exactly the tokens that
    sorting the token ids, cutting the sorted list and scattering the cut back would keep."""
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])[:, None]
    ordered, order = torch.sort(logits, descending=True, dim=-1)
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p
    drop[:, 0] = False
    expected = ~drop.scatter(-1, order, drop)
    assert torch.equal(torch.isfinite(top_p_filter(logits, p)), expected)


def test_repetition_penalty_discourages_seen_tokens() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, 1.5, -2.0]]
    params = SamplingParams(repetition_penalty=2.0)
    assert draw(process_logits(logits, params, seen=seen), params, [None]).item() == 1


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    logits = torch.randn(6, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(draw(process_logits(logits, SamplingParams()), SamplingParams(), [None] * 6), greedy)
    params = SamplingParams(temperature=5.0, top_k=1)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    assert torch.equal(draw(process_logits(logits, params), params, gens), greedy)


def test_each_row_draws_from_its_own_generator() -> None:
    """Row 0 with seed 7 draws the same token whether or not other rows are in the batch."""
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(4, 1000)
    alone = [draw(logits[:1], params, [torch.Generator().manual_seed(7)]).item() for _ in range(3)]
    batched = draw(logits, params, [torch.Generator().manual_seed(s) for s in (7, 1, 2, 3)])
    assert alone == [batched[0].item()] * 3


def test_draws_follow_the_distribution_and_never_pick_a_filtered_token() -> None:
    """4000 draws from softmax over (0.1, 0, 0.2, 0.7) (token 1 filtered out): frequencies within
    5 standard deviations of the probabilities."""
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7])
    scores = probs.log().expand(4000, 4)  # log(0) = -inf, as the filters leave it
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    counts = torch.bincount(draw(scores, SamplingParams(temperature=1.0), gens), minlength=4)
    assert counts[1] == 0
    expected, spread = 4000 * probs, (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - expected).abs() <= 5 * spread).all(), counts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \[0.01, 100"),
        (dict(presence_penalty=3.0), "presence_penalty must be in"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    assert issubclass(KimbhoError, ValueError)
