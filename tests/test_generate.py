import pytest
import torch

import kimbho
from kimbho.errors import KimbhoError
from kimbho.generation import encode_prompt
from kimbho.sampling import SamplingParams, min_p_filter, next_token, top_k_filter, top_p_filter


def _naive_greedy(model: kimbho.KimbhoV1Model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The seed README's inference loop: full forward each step, argmax."""
    with torch.no_grad():
        for _ in range(n):
            next_token = model(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_cached_greedy_equals_the_seed_loop(tiny_model: kimbho.KimbhoV1Model) -> None:
    ids = torch.tensor([[12, 45, 67]])
    assert torch.equal(
        kimbho.generate(tiny_model, ids, max_new_tokens=20), _naive_greedy(tiny_model, ids, 20)
    )


def test_batch_rows_equal_single_rows(tiny_model: kimbho.KimbhoV1Model) -> None:
    ids = torch.randint(5, 512, (3, 6))
    batched = kimbho.generate(tiny_model, ids, max_new_tokens=10)
    for row in range(3):
        assert torch.equal(
            batched[row], kimbho.generate(tiny_model, ids[row : row + 1], max_new_tokens=10)[0]
        )


def test_seeded_sampling_is_reproducible(tiny_model: kimbho.KimbhoV1Model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    a = kimbho.generate(tiny_model, ids, 30, temperature=1.0, seed=3)
    b = kimbho.generate(tiny_model, ids, 30, temperature=1.0, seed=3)
    c = kimbho.generate(tiny_model, ids, 30, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(tiny_model: kimbho.KimbhoV1Model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(
        kimbho.generate(tiny_model, ids, 15, temperature=1.5, top_k=1, seed=0),
        kimbho.generate(tiny_model, ids, 15),
    )


def test_max_new_tokens_and_eos(tiny_model: kimbho.KimbhoV1Model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    assert kimbho.generate(tiny_model, ids, 0).shape == (1, 3)
    greedy = kimbho.generate(tiny_model, ids, 12)
    eos = int(greedy[0, 5])  # make the 3rd generated token the end of text
    stopped = kimbho.generate(tiny_model, ids, 12, eos_token_id=eos)
    assert stopped.shape[1] <= 6 and int(stopped[0, -1]) == eos


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=62), "exceeds the model's context of 64"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-2), "top_k must be >= 0"),
    ],
)
def test_bad_arguments_are_value_errors(tiny_model: kimbho.KimbhoV1Model, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kimbho.generate(tiny_model, torch.tensor([[5, 6, 7]]), **kwargs)


def test_filters_are_pure_and_correct() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    original = logits.clone()
    assert (
        torch.isinf(top_k_filter(logits, 2)[0, 2:]).all()
        and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    )
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() >= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True, False, False, False, False]
    assert torch.isfinite(min_p_filter(logits, 0.2))[0].tolist() == [True, True, False, False, False]
    assert torch.equal(logits, original)


def test_repetition_penalty_discourages_seen_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    assert next_token(logits, params, seen=torch.tensor([[0]])).item() == 1


def test_stream_text_equals_generate_text(trained_run, tokenizer) -> None:
    model, tok = kimbho.load(trained_run)
    prompt = "The assert statement"
    pieces = list(kimbho.stream(model, tok, prompt, max_new_tokens=40, temperature=0.9, seed=11))
    ids = kimbho.generate(
        model, encode_prompt(tok, prompt), 40, temperature=0.9, seed=11, eos_token_id=tok.eot_id
    )
    new = ids[0, len(tok.encode(prompt)) :].tolist()
    if tok.eot_id in new:
        new = new[: new.index(tok.eot_id)]
    assert "".join(pieces) == tok.decode(new)
    for piece in pieces:
        piece.encode("utf-8")  # strict: no lone surrogates


def test_empty_prompt_starts_from_end_of_text(tokenizer) -> None:
    assert encode_prompt(tokenizer, "").tolist() == [[tokenizer.eot_id]]


def test_non_2d_input_is_refused(tiny_model) -> None:
    with pytest.raises(KimbhoError):
        kimbho.generate(tiny_model, torch.tensor([5, 6]), 3)
