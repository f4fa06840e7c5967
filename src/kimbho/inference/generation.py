"""Generation for callers: `generate` (equal-length prompts in a tensor), `generate_batch` (prompts
of any lengths), `stream` (text pieces as they come). Each is a thin wrapper over the `Engine`
(continuous batching over a key/value cache) or, for `num_beams > 1`, `beam_search` on one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..data.tokenizer import Tokenizer
from ..device import compile_decode
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from .beam_search import beam_search
from .chat import ChatFormat
from .engine import Engine, Request
from .sampling import SamplingParams

MAX_SLOTS = 64  # generate_batch decodes at most this many sequences at once; the rest wait


def generate(
    model: KimbhoV1Model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    eos_token_id: int | None = None,
    seed: int | None = None,
    **options: float | bool,
) -> torch.Tensor:
    """Continue each row of `input_ids` (B, T); returns (B, T + new) token ids.

    A row that produced `eos_token_id` is padded with it up to the longest row. Each row equals
    what it gives alone, seeded rows included: every row draws from a generator seeded with
    `seed`. `options` are the further keywords of `generate_batch`."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise KimbhoError("the prompt must be a (batch, length) tensor of at least one token")
    rows = generate_batch(
        model,
        list(input_ids),
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        num_beams,
        eos_token_id,
        seed,
        **options,  # type: ignore[arg-type]
    )
    width = max(len(r) for r in rows)
    if eos_token_id is not None:  # only then can a row end early
        rows = [r + [eos_token_id] * (width - len(r)) for r in rows]
    return torch.tensor(rows, dtype=torch.long, device=model.embed.weight.device)


def generate_batch(
    model: KimbhoV1Model,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    eos_token_id: int | None = None,
    seed: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    compile: bool | None = None,
) -> list[list[int]]:
    """Continue prompts of different lengths together; returns one list per prompt: the prompt,
    then its continuation (ending with `eos_token_id` if it produced it). Each list equals what
    its prompt gives alone. `length_penalty` and `early_stopping` apply to beam search.
    `compile` is the engine's (see `Engine`)."""
    params = SamplingParams(
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty
    )
    _check_beams(num_beams, params, seed)
    stop = (eos_token_id,) if eos_token_id is not None else ()
    requests = [
        Request(p.tolist() if isinstance(p, torch.Tensor) else p, max_new_tokens, params, seed, stop)
        for p in prompts
    ]
    if not requests:
        return []
    compile = compile_decode(compile, model.embed.weight.device)
    max_len = _slot_length(model, max(len(r.prompt) for r in requests) + max_new_tokens, compile)
    if num_beams > 1:
        engine = Engine(model, slots=num_beams, max_len=max_len, compile=compile)
        best = [
            beam_search(
                engine, r.prompt, num_beams, max_new_tokens, eos_token_id, length_penalty, early_stopping
            )
            for r in requests
        ]
        return [[*r.prompt, *b.tokens] for r, b in zip(requests, best, strict=True)]
    slots = min(len(requests), MAX_SLOTS)
    if compile is not False:  # a power of two: a few shapes, each compiled once (at most 8 a process)
        slots = 1 << (slots - 1).bit_length()
    engine = Engine(model, slots=slots, max_len=max_len, compile=compile)
    outputs = [list(r.prompt) for r in requests]
    for event in engine.run(requests):
        outputs[event.request_id].append(event.token)  # ids count up in the order of the requests
    return outputs


def stream(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    seed: int | None = None,
    stop: Sequence[str] = (),
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    compile: bool | None = None,
    chat: ChatFormat | None = None,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, each whole characters (valid UTF-8):
    joined, they equal the decoded output of `generate`. Stops at end-of-text or at a `stop`
    string (not included). Beam search has no meaningful partial output: its text comes in one
    piece at the end. `compile` is the engine's (see `Engine`). With a `chat` format, `prompt`
    is a conversation (a list of messages, or one user message's text) and the pieces are the
    assistant's reply, which ends at the format's end of turn."""
    if chat is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, eot = chat.encode(messages), chat.stop_token_ids
    elif isinstance(prompt, str):
        ids = encode_prompt(tokenizer, prompt)[0].tolist()
        eot = (tokenizer.eot_id,) if tokenizer.eot_id is not None else ()
    else:
        raise KimbhoError("a list of messages needs the model's chat format (chat=ChatFormat.for_model(...))")
    params = SamplingParams(
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty
    )
    request = Request(ids, max_new_tokens, params, seed, eot, tuple(stop))
    compile = compile_decode(compile, model.embed.weight.device)
    if num_beams != 1:
        _check_beams(num_beams, params, seed)
        if stop:
            raise KimbhoError("stop strings are not supported with beam search")
        [row] = generate_batch(
            model,
            [ids],
            max_new_tokens,
            num_beams=num_beams,
            eos_token_id=eot[0] if eot else None,
            compile=compile,
        )
        new = row[len(ids) :]
        return iter([tokenizer.decode(new[:-1] if new and new[-1] in eot else new)])
    max_len = _slot_length(model, len(ids) + max_new_tokens, compile)
    engine = Engine(model, tokenizer, slots=1, max_len=max_len, compile=compile)
    engine.check(request)  # here, not at the first piece
    return (event.text for event in engine.run([request]) if event.text)


def _check_beams(num_beams: int, params: SamplingParams, seed: int | None) -> None:
    """At least one beam; and beam search keeps the most likely continuations, drawing nothing
    and applying no penalties, so sampling options with it would be silently ignored: refused."""
    if num_beams < 1:
        raise KimbhoError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams == 1:
        return
    given = [
        name
        for name, value, off in (
            ("temperature", params.temperature, 0.0),
            ("top_k", params.top_k, None),
            ("top_p", params.top_p, None),
            ("min_p", params.min_p, None),
            ("repetition_penalty", params.repetition_penalty, 1.0),
            ("presence_penalty", params.presence_penalty, 0.0),
            ("frequency_penalty", params.frequency_penalty, 0.0),
            ("seed", seed, None),
        )
        if value != off
    ]
    if given:
        raise KimbhoError(
            f"beam search is deterministic and takes no sampling options: drop {', '.join(given)}, "
            f"or sample with num_beams=1"
        )


def _slot_length(model: KimbhoV1Model, needed: int, compile: bool | None) -> int:
    """The engine's slot length: what the longest sequence needs, or where the step is compiled
    (now or in the background) the whole context, so that every call reuses the graphs compiled
    for that shape."""
    context = model.config.max_seq_len
    return context if compile is not False else min(needed, context)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) ids of `prompt`; an empty prompt starts from the end-of-text token, as a new document."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise KimbhoError("empty prompt, and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eot_id]
    return torch.tensor([ids], dtype=torch.long)
