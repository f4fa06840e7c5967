import pytest
import torch

import kimbho
from kimbho.inference.engine import Engine, Request, TokenEvent
from kimbho.inference.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
)


def _tokens(events: list[TokenEvent]) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = {}
    for e in events:
        out.setdefault((e.request_id, e.index), []).append(e.token)
    return out


def _alone(model: kimbho.KimbhoV1Model, request: Request) -> list[list[int]]:
    """Each sample of `request`, generated in an engine of its own."""
    engine = Engine(model, slots=request.n)
    tokens = _tokens(list(engine.run([request])))
    return [tokens[(0, i)] for i in range(request.n)]


def test_continuous_batching_equals_one_request_at_a_time(peaked_model) -> None:
    """Five requests of different lengths, sampling settings and seeds through two slots: each
    new request is prefilled into a freed slot while the other keeps decoding, and every request
    gets exactly the tokens it gets alone."""
    requests = [
        Request([5, 6, 7], 12),
        Request(list(range(30, 50)), 4, SamplingParams(temperature=1.0), seed=1),
        Request([9], 9, SamplingParams(temperature=0.7, top_p=0.9), seed=2),
        Request([100, 200], 7, SamplingParams(temperature=1.2, top_k=10, repetition_penalty=1.5), seed=3),
        Request([42] * 5, 10, SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)),
    ]
    engine = Engine(peaked_model, slots=2)
    events = list(engine.run(requests))
    tokens = _tokens(events)
    for i, request in enumerate(requests):
        assert tokens[(i, 0)] == _alone(peaked_model, request)[0]
        assert len(tokens[(i, 0)]) == request.max_new_tokens
    assert [e.finish_reason for e in events].count("length") == 5 and not engine.busy


def test_request_added_mid_flight(peaked_model) -> None:
    a = Request([5, 6, 7], 10, SamplingParams(temperature=1.0), seed=4)
    b = Request([11, 12], 5, SamplingParams(temperature=1.0), seed=4)
    engine = Engine(peaked_model, slots=3)
    engine.add(a)
    events = engine.step() + engine.step() + engine.step()
    engine.add(b)
    while engine.busy:
        events += engine.step()
    tokens = _tokens(events)
    assert tokens[(0, 0)] == _alone(peaked_model, a)[0] and tokens[(1, 0)] == _alone(peaked_model, b)[0]


def test_n_samples_share_a_prefill_and_differ(peaked_model) -> None:
    request = Request([5, 6, 7], 10, SamplingParams(temperature=1.0), seed=10, n=3)
    samples = _alone(peaked_model, request)
    assert len({tuple(s) for s in samples}) == 3
    for i, sample in enumerate(samples):  # sample i is what seed + i gives alone
        assert (
            sample
            == _alone(peaked_model, Request([5, 6, 7], 10, SamplingParams(temperature=1.0), seed=10 + i))[0]
        )


def test_penalties_match_a_plain_reference_loop(peaked_model) -> None:
    """Greedy with all three penalties equals a loop that recomputes everything from scratch."""
    prompt, params = (
        [5, 6, 7, 5],
        SamplingParams(repetition_penalty=1.8, presence_penalty=0.6, frequency_penalty=0.4),
    )
    ids, vocab = list(prompt), peaked_model.config.vocab_size
    with torch.no_grad():
        for _ in range(15):
            logits = peaked_model(torch.tensor([ids]))[:, -1]
            seen = torch.zeros(1, vocab, dtype=torch.bool)
            seen[0, ids] = True
            counts = torch.bincount(torch.tensor(ids[len(prompt) :], dtype=torch.long), minlength=vocab)[
                None
            ].float()
            logits = apply_repetition_penalty(logits, seen, 1.8)
            ids.append(int(apply_presence_frequency_penalty(logits, counts, 0.6, 0.4).argmax()))
    assert _alone(peaked_model, Request(prompt, 15, params))[0] == ids[len(prompt) :]
    assert _alone(peaked_model, Request(prompt, 15))[0] != ids[len(prompt) :]  # the penalties did something


def test_logprobs_are_the_models_own(peaked_model) -> None:
    prompt = [5, 6, 7]
    engine = Engine(peaked_model, slots=1)
    events = list(engine.run([Request(prompt, 6, SamplingParams(temperature=1.0), seed=0, logprobs=3)]))
    tokens = [e.token for e in events]
    with torch.no_grad():
        table = torch.log_softmax(peaked_model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1], -1)
    for t, (event, row) in enumerate(zip(events, table, strict=True)):
        assert event.logprob == pytest.approx(row[event.token].item(), abs=1e-4)
        best = row.topk(3)
        assert [tok for tok, _ in event.top_logprobs] == best.indices.tolist(), t
        assert [lp for _, lp in event.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    plain = list(Engine(peaked_model).run([Request(prompt, 3)]))
    assert all(e.logprob is None and e.top_logprobs is None for e in plain)


def test_stop_tokens_end_a_sequence(peaked_model) -> None:
    free = _alone(peaked_model, Request([5, 6, 7], 12))[0]
    stop = free[4]
    events = list(Engine(peaked_model).run([Request([5, 6, 7], 12, stop_token_ids=(99999 % 512, stop))]))
    first = next(i for i, t in enumerate(free) if t in (stop, 99999 % 512))
    assert [e.token for e in events] == free[: first + 1]
    assert events[-1].finish_reason == "stop"


def test_stop_strings_cut_the_text(trained_run) -> None:
    model, tok = kimbho.load(trained_run)
    prompt = tok.encode("The with statement")
    free = "".join(e.text for e in Engine(model, tok).run([Request(prompt, 40)]))
    stop = free[12:15]  # some text from the middle, possibly spanning tokens
    expected = free[: free.index(stop)]
    events = list(Engine(model, tok).run([Request(prompt, 40, stop=("zzzz-never", stop))]))
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop" and len(events) < 40


def test_cancel_frees_the_slots(peaked_model) -> None:
    engine = Engine(peaked_model, slots=3)
    first = engine.add(Request([5, 6], 20, n=2))
    engine.step()
    assert engine.free_slots == 1
    engine.cancel(first)
    assert engine.free_slots == 3 and not engine.busy and engine.step() == []


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: Request([5] * 60, 10),
            "prompt of 60 tokens \\+ 10 new tokens exceeds the model's context of 64",
        ),
        (lambda: Request([5, 512], 3), "token id 512 is outside the model's vocabulary of 512"),
        (lambda: Request([5], 3, n=3), "need 3 free slots and the engine has 2"),
        (lambda: Request([5], 3, stop=("x",)), "stop strings need text"),
        (lambda: Request([], 3), "the prompt is empty"),
        (lambda: Request([5], -1), "max_new_tokens must be >= 0"),
        (lambda: Request([5], 3, n=0), "n \\(samples per prompt\\) must be >= 1"),
        (lambda: Request([5], 3, logprobs=-1), "logprobs must be >= 0"),
    ],
)
def test_bad_requests_are_value_errors(tiny_model, make, message: str) -> None:
    engine = Engine(tiny_model, slots=2)
    with pytest.raises(ValueError, match=message):
        engine.add(make())
    assert engine.free_slots == 2


def test_engine_size_errors(tiny_model) -> None:
    with pytest.raises(ValueError, match="max_len must be in \\[1, 64\\]"):
        Engine(tiny_model, max_len=100)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        Engine(tiny_model, slots=0)
    with pytest.raises(ValueError, match="exceeds the engine's slot length of 16"):
        list(Engine(tiny_model, max_len=16).run([Request([5] * 10, 10)]))


def test_prompts_of_neighbouring_slots_are_prefilled_together(peaked_model) -> None:
    """add_batch prefills prompts of different lengths in one padded pass, except one whose
    padding would more than double the work; the results equal one-by-one adds."""
    requests = [
        Request([5, 6, 7], 6),
        Request([8, 9, 10, 11, 12], 6),
        Request([1, 2], 6),
        Request([4] * 40, 6, n=2),
    ]
    together, apart = Engine(peaked_model, slots=5), Engine(peaked_model, slots=5)
    passes: list[list[int]] = []
    prefill = together.prefill
    together.prefill = lambda first, prompts: (
        passes.append([len(p) for p in prompts]) or prefill(first, prompts)
    )  # type: ignore[method-assign]
    together.add_batch(requests)
    assert passes == [[3, 5, 2], [40]]
    for r in requests:
        apart.add(r)
    torch.testing.assert_close(together.logits, apart.logits, atol=1e-5, rtol=1e-5)
    assert together.lengths == apart.lengths == [3, 5, 2, 40, 40]
    a, b = [], []
    while together.busy:
        a += together.step()
        b += apart.step()
    assert _tokens(a) == _tokens(b)
