from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.errors import KimbhoError
from kimbho.inference.engine import Engine
from kimbho.inference.generation import encode_prompt
from tests.conftest import run_cli


def _naive_greedy(model: kimbho.KimbhoV1Model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The seed README's inference loop: full forward each step, argmax."""
    with torch.no_grad():
        for _ in range(n):
            next_token = model(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_cached_greedy_equals_the_seed_loop(tiny_model, peaked_model) -> None:
    """The fast path (prefill once, one token per step through the cache) picks exactly the
    tokens of the plain full forward, batch rows included."""
    ids = torch.tensor([[12, 45, 67], [3, 99, 500]])
    for model in (tiny_model, peaked_model):
        assert torch.equal(kimbho.generate(model, ids, max_new_tokens=40), _naive_greedy(model, ids, 40))


def test_batch_rows_equal_single_rows(peaked_model) -> None:
    ids = torch.randint(5, 512, (3, 6))
    for options in (dict(), dict(temperature=1.0, top_p=0.9, seed=5)):
        batched = kimbho.generate(peaked_model, ids, 12, **options)
        for row in range(3):
            assert torch.equal(
                batched[row], kimbho.generate(peaked_model, ids[row : row + 1], 12, **options)[0]
            )


def test_generate_batch_prompts_of_different_lengths(peaked_model) -> None:
    prompts = [[5, 6, 7], [9], list(range(20, 40)), [400, 401]]
    for options in (dict(), dict(temperature=0.8, top_k=20, seed=3), dict(repetition_penalty=1.3)):
        rows = kimbho.generate_batch(peaked_model, prompts, 15, **options)
        assert rows == [kimbho.generate_batch(peaked_model, [p], 15, **options)[0] for p in prompts]
        assert [r[: len(p)] for r, p in zip(rows, prompts, strict=True)] == prompts
        assert all(len(r) == len(p) + 15 for r, p in zip(rows, prompts, strict=True))
    assert kimbho.generate_batch(peaked_model, [], 5) == []


def test_generate_batch_with_end_of_text(peaked_model) -> None:
    prompts = [[5, 6, 7], [9], list(range(20, 30))]
    free = kimbho.generate_batch(peaked_model, prompts, 10)
    eos = free[1][3]  # the 3rd token the second prompt produces
    rows = kimbho.generate_batch(peaked_model, prompts, 10, eos_token_id=eos)
    for prompt, row, full in zip(prompts, rows, free, strict=True):  # each row stops at its own first eos
        new = full[len(prompt) :]
        assert row == (prompt + new[: new.index(eos) + 1] if eos in new else full)
    assert rows[1] == free[1][:4]
    padded = kimbho.generate(peaked_model, torch.tensor([[9]]), 10, eos_token_id=eos)
    assert padded[0].tolist() == rows[1]


def test_seeded_sampling_is_reproducible(peaked_model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    a = kimbho.generate(peaked_model, ids, 30, temperature=1.0, seed=3)
    b = kimbho.generate(peaked_model, ids, 30, temperature=1.0, seed=3)
    c = kimbho.generate(peaked_model, ids, 30, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(1)  # unseeded calls follow torch's global seed
    d = kimbho.generate(peaked_model, ids, 30, temperature=1.0)
    torch.manual_seed(1)
    assert torch.equal(d, kimbho.generate(peaked_model, ids, 30, temperature=1.0))


def test_top_k_one_is_greedy(peaked_model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(
        kimbho.generate(peaked_model, ids, 15, temperature=1.5, top_k=1, seed=0),
        kimbho.generate(peaked_model, ids, 15),
    )


def test_max_new_tokens_and_eos(tiny_model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    assert kimbho.generate(tiny_model, ids, 0).shape == (1, 3)
    greedy = kimbho.generate(tiny_model, ids, 12)
    assert greedy.shape == (1, 15)
    eos = int(greedy[0, 5])  # make the 3rd generated token the end of text
    stopped = kimbho.generate(tiny_model, ids, 12, eos_token_id=eos)
    assert stopped.shape[1] <= 6 and int(stopped[0, -1]) == eos


def test_long_prompt_fills_the_context_exactly(tiny_model) -> None:
    ids = torch.randint(5, 512, (1, 60))
    out = kimbho.generate(tiny_model, ids, 4)
    assert out.shape == (1, 64) and torch.equal(out, _naive_greedy(tiny_model, ids, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=62), "prompt of 3 tokens \\+ 62 new tokens exceeds the model's context of 64"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(num_beams=0), "num_beams must be >= 1"),
    ],
)
def test_bad_arguments_are_value_errors(tiny_model, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kimbho.generate(tiny_model, torch.tensor([[5, 6, 7]]), **kwargs)


def test_bad_prompts_are_value_errors(tiny_model) -> None:
    with pytest.raises(ValueError, match="longer than the model's context|exceeds the model's context"):
        kimbho.generate(tiny_model, torch.randint(5, 512, (1, 70)), 1)
    with pytest.raises(ValueError, match="the prompt is empty"):
        kimbho.generate_batch(tiny_model, [[5], []], 3)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 512"):
        kimbho.generate_batch(tiny_model, [[5, 600]], 3)
    with pytest.raises(KimbhoError, match="at least one token"):
        kimbho.generate(tiny_model, torch.tensor([5, 6]), 3)


def test_stream_text_equals_generate_text(trained_run) -> None:
    model, tok = kimbho.load(trained_run)
    prompt = "The assert statement"
    for options in (dict(temperature=0.9, seed=11), dict(), dict(temperature=1.0, top_k=40, seed=2)):
        pieces = list(kimbho.stream(model, tok, prompt, max_new_tokens=40, **options))
        ids = kimbho.generate(model, encode_prompt(tok, prompt), 40, eos_token_id=tok.eot_id, **options)
        new = ids[0, len(tok.encode(prompt)) :].tolist()
        if tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        assert "".join(pieces) == tok.decode(new)
        assert all(pieces)


def test_stream_pieces_are_whole_characters(peaked_model, tokenizer) -> None:
    """A random model emits arbitrary byte tokens, split characters and invalid bytes included:
    every piece is valid UTF-8 and the pieces join to exactly the decoded ids."""
    for seed in range(6):
        pieces = list(kimbho.stream(peaked_model, tokenizer, "café ü", 50, temperature=1.5, seed=seed))
        ids = kimbho.generate(
            peaked_model,
            encode_prompt(tokenizer, "café ü"),
            50,
            temperature=1.5,
            seed=seed,
            eos_token_id=tokenizer.eot_id,
        )[0, len(tokenizer.encode("café ü")) :].tolist()
        if tokenizer.eot_id in ids:
            ids = ids[: ids.index(tokenizer.eot_id)]
        assert "".join(pieces) == tokenizer.decode(ids)
        for piece in pieces:
            piece.encode("utf-8")  # strict: no lone surrogates


def test_stream_checks_its_arguments_before_yielding(tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        kimbho.stream(tiny_model, tokenizer, "x", 100)  # raised by the call, not the first piece
    with pytest.raises(ValueError, match="top_p must be in"):
        kimbho.stream(tiny_model, tokenizer, "x", 5, top_p=2.0)


def test_empty_prompt_starts_from_end_of_text(tokenizer) -> None:
    assert encode_prompt(tokenizer, "").tolist() == [[tokenizer.eot_id]]


@pytest.mark.slow
@pytest.mark.parametrize("slots", [2])  # buckets of 1 and 2 slots: three prompts in two slots use both
def test_compiled_decode_step_picks_the_same_tokens(tiny_model, slots: int) -> None:
    """The compiled decode step (static shapes but for the cached length, matrix-vector
    products rewritten on the CPU) picks the eager step's greedy tokens."""
    prompts = [[12, 45, 67], [3], list(range(100, 120))]
    eager = kimbho.generate_batch(tiny_model, prompts, 20)
    engine = Engine(tiny_model, slots=slots, max_len=48, compile=True)
    rows = [list(p) for p in prompts]
    for event in engine.run([kimbho.Request(p, 20) for p in prompts]):
        rows[event.request_id].append(event.token)
    assert rows == eager


def test_a_denormal_repetition_penalty_is_refused(tiny_model) -> None:
    """Dividing logits by 1e-310 gives infinities and then NaN: refused in the Python API as in
    the HTTP one, with the same bounds."""
    for penalty in (1e-310, 0.0, 1e3, float("nan")):
        with pytest.raises(KimbhoError, match=r"repetition_penalty must be in \[0.01, 100"):
            kimbho.generate(tiny_model, torch.tensor([[5, 6, 7]]), 4, repetition_penalty=penalty)


def test_compiling_decides_the_slot_shapes_too(tiny_model, monkeypatch) -> None:
    """Where compiling is the default (CUDA), `compile=None` must give the engine the shapes a
    compiled step reuses: slots of the whole context, a power-of-two slot count. Here the CPU is
    made to look like such a device; the engine itself runs eager, so the test stays fast."""
    import kimbho.inference.generation as generation

    built: list[tuple[int, int, bool]] = []

    class Recorded(Engine):
        def __init__(self, model, tokenizer=None, slots=1, max_len=None, compile=None):  # type: ignore[no-untyped-def]
            built.append((slots, max_len, compile))
            super().__init__(model, tokenizer, slots=slots, max_len=max_len, compile=False)

    monkeypatch.setattr(generation, "Engine", Recorded)
    monkeypatch.setattr(generation, "compile_decode", lambda requested, device: requested is not False)
    context = tiny_model.config.max_seq_len
    kimbho.generate_batch(tiny_model, [[5, 6, 7], [8, 9], [10]], 4)
    kimbho.generate_batch(tiny_model, [[5, 6, 7, 8, 9]], 6)
    list(kimbho.stream(tiny_model, _tokenizer_for(tiny_model), "ab", 3))
    assert built == [(4, context, True), (1, context, True), (1, context, True)]
    kimbho.generate_batch(tiny_model, [[5, 6, 7]], 4, compile=False)
    assert built[-1] == (1, 7, False)  # eager: only what the sequence needs


def _tokenizer_for(model: kimbho.KimbhoV1Model) -> kimbho.Tokenizer:
    """A byte-level tokenizer small enough for the `tiny` model's vocabulary."""
    return kimbho.Tokenizer.train(["ab ba abba " * 20], vocab_size=min(300, model.config.vocab_size))


def test_generate_chat_replies_in_the_models_chat_format(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--chat`: the prompt is a user message, formatted as the model was trained (here Kimbho's
    role tokens), and the reply, cut at the end of turn, is what is printed."""
    from kimbho.inference.chat import ChatFormat

    model, tokenizer = kimbho.load(trained_run)
    chat = ChatFormat(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    prompt = chat.encode(messages)
    [row] = kimbho.generate_batch(model, [prompt], max_new_tokens=24, eos_token_id=tokenizer.eot_id)
    reply = row[len(prompt) :]
    reply = reply[: reply.index(tokenizer.eot_id)] if tokenizer.eot_id in reply else reply
    args = ["--prompt", "What is a list?", "--temperature", "0", "--max-new-tokens", 24]
    assert run_cli("generate", trained_run, "--system", "Be brief.", *args) == 0
    assert capsys.readouterr().out == tokenizer.decode(reply) + "\n"
    assert run_cli("generate", trained_run, "--chat", *args, "--stream") == 0
    assert capsys.readouterr().out.endswith("\n")
