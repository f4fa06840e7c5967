"""The generation loop: one generator that yields tokens, reused by `generate`, `stream`, the CLI
and the tests. The prompt is prefilled into a key/value cache in one pass; each later step feeds
one token per row."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import KimbhoError
from .model import KimbhoV1Model
from .sampling import SamplingParams, next_token
from .tokenizer import Tokenizer


@torch.inference_mode()
def generate_tokens(
    model: KimbhoV1Model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), up to `max_new_tokens` times; stop early once every
    row has produced `eos_token_id` (rows that finished keep yielding it)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise KimbhoError("the prompt must be a (batch, length) tensor of at least one token")
    if max_new_tokens < 0:
        raise KimbhoError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch, prompt_len = input_ids.shape
    context = model.config.max_seq_len
    if prompt_len + max_new_tokens > context:
        raise KimbhoError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of {context}"
        )
    if max_new_tokens == 0:
        return
    device = model.embed.weight.device
    input_ids = input_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(batch, prompt_len + max_new_tokens)
    seen = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model.head(model.features(input_ids, cache)[:, -1])  # only the last position matters
    for step in range(max_new_tokens):
        token = next_token(logits, params, seen if params.repetition_penalty != 1.0 else None, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        yield token
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        seen = torch.cat([seen, token[:, None]], dim=1)
        logits = model.head(model.features(token[:, None], cache)[:, -1])


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
) -> torch.Tensor:
    """Continue each row of `input_ids` (B, T); returns (B, T + new) token ids."""
    if num_beams != 1:
        raise KimbhoError("beam search (num_beams > 1) is not available yet")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    new = list(generate_tokens(model, input_ids, max_new_tokens, params, eos_token_id, seed))
    out = [input_ids.to(model.embed.weight.device)] + [t[:, None] for t in new]
    return torch.cat(out, dim=1)


def stream(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    **sampling: object,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, each valid UTF-8: a character whose bytes
    span several tokens is held back until it is complete. Stops at end-of-text."""
    seed = sampling.pop("seed", None)
    params = SamplingParams(**sampling)  # type: ignore[arg-type]
    ids = encode_prompt(tokenizer, prompt)
    generated: list[int] = []
    emitted = ""
    for token in generate_tokens(model, ids, max_new_tokens, params, tokenizer.eot_id, seed):  # type: ignore[arg-type]
        if tokenizer.eot_id is not None and int(token[0]) == tokenizer.eot_id:
            break
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue  # an incomplete character: wait for its remaining bytes
        yield text[len(emitted) :]
        emitted = text
    text = tokenizer.decode(generated)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) ids of `prompt`; an empty prompt starts from the end-of-text token, as a new document."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise KimbhoError("empty prompt, and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eot_id]
    return torch.tensor([ids], dtype=torch.long)
