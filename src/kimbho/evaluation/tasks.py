"""Task evaluation (`kimbho eval --task`): did the model learn to answer?

A task file is JSONL, one item per line, all of one kind (INTERFACE.md):

    {"query": "...", "choices": ["...", "..."], "gold": 0}     multiple choice
    {"prompt": "...", "answer": "..."}                         generative, plain prompt
    {"messages": [...], "answer": "..."}                       generative, in the model's chat format

Multiple choice scores each choice by its log-likelihood after the query (the choice's text is
appended to the query as it is: put the separating space in the choice, " yes"); the item is
right when the gold choice has the highest log-likelihood per character (lm-evaluation-harness's
`acc_norm`). `centered` rescales accuracy so that chance (1 / number of choices) is 0 and perfect
is 1. All choices of all items are scored together: packed into rows of the model's context,
each item's query once and its choices after it, each choice attending only to its own query
and itself, one forward pass per batch of rows.

Generative items are answered greedily (a plain prompt's reply ends at a newline or end-of-text,
a chat reply at the end of its turn) and scored by exact match, whitespace and case normalised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.chat_data import best_fit
from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from ..model.loss import IGNORE

# Logits materialised at once while scoring (rows x positions x vocabulary): 256 MB in fp32.
_LOGITS_PER_PASS = 64 * 2**20


@dataclass(frozen=True)
class MultipleChoice:
    query: str
    choices: tuple[str, ...]
    gold: int
    where: str


@dataclass(frozen=True)
class Generative:
    """A plain prompt or chat messages (exactly one of the two is set), and the answer."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    answer: str
    where: str


Item = MultipleChoice | Generative


def read_task(path: Path, skip_bad: bool = False) -> tuple[list[Item], list[str]]:
    """The items of a task file, and (with `skip_bad`) the reasons for the lines left out;
    without it the first bad line is an error naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise KimbhoError(f"task file {path} does not exist") from None
    except UnicodeDecodeError:
        raise KimbhoError(f"task file {path} is not UTF-8 text") from None
    items: list[Item] = []
    bad: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            items.append(_parse(line, where))
        except KimbhoError as e:
            if not skip_bad:
                raise KimbhoError(f"{e}; fix the line, or pass --skip-bad to leave such lines out") from None
            bad.append(str(e))
    kinds = {type(i) for i in items}
    if len(kinds) > 1:
        raise KimbhoError(
            f"task file {path} mixes multiple-choice and generative items; give each its own file"
        )
    if not items:
        raise KimbhoError(f"task file {path} holds no usable item" + (f" ({bad[0]})" if bad else ""))
    return items, bad


def _parse(line: str, where: str) -> Item:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise KimbhoError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise KimbhoError(f"{where}: expected a JSON object")
    if "choices" in value or "query" in value:
        query, choices, gold = value.get("query"), value.get("choices"), value.get("gold")
        if not isinstance(query, str):
            raise KimbhoError(f'{where}: a multiple-choice item needs a string "query"')
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise KimbhoError(f'{where}: "choices" must be a list of strings')
        if not choices:
            raise KimbhoError(f'{where}: "choices" is empty')
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise KimbhoError(
                f'{where}: "gold" must be the index of one of the {len(choices)} choices, got {gold!r}'
            )
        if any(not c for c in choices):
            raise KimbhoError(f"{where}: a choice is empty: nothing to score")
        return MultipleChoice(query, tuple(choices), gold, where)
    answer = value.get("answer")
    if not isinstance(answer, str):
        raise KimbhoError(
            f'{where}: expected "query"/"choices"/"gold", or "prompt" or "messages" with "answer"'
        )
    if isinstance(value.get("prompt"), str):
        return Generative(value["prompt"], None, answer, where)
    messages = value.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return Generative(
            None, tuple({"role": m["role"], "content": m["content"]} for m in messages), answer, where
        )
    raise KimbhoError(
        f'{where}: a generative item needs a string "prompt" or a list of {{role, content}} "messages"'
    )


# --- multiple choice --------------------------------------------------------------------------


def continuation_ids(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `context + continuation`, encoded as one text and split
    where the context's own ids end (so the boundary is tokenized as it would be in running
    text); an empty context starts from end-of-text, as a new document does."""
    from ..inference.generation import encode_prompt

    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    if head and whole[: len(head)] == head:
        return head, whole[len(head) :]
    return encode_prompt(tokenizer, context)[0].tolist(), tokenizer.encode(continuation)


@dataclass
class TokenScores:
    """Per continuation token: its log-probability given everything before it, whether it was
    the likeliest token there, and (when asked for) the `top` likeliest (token, log-probability)."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]]


@dataclass(frozen=True)
class _Group:
    """Continuations of one context, scored together: the context's ids but the last once (the
    query segment), then per continuation the context's last id and the continuation's ids but
    its last (a branch that sees the query segment and itself, its positions continuing it)."""

    context: tuple[int, ...]
    members: tuple[int, ...]  # pair indices
    length: int  # positions it fills


def _groups(pairs: Sequence[tuple[list[int], list[int]]], seq_len: int) -> list[_Group]:
    """The pairs grouped by context, each group fitting a row (a context with more
    continuations than fit one row becomes several groups)."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx:
            raise KimbhoError("a continuation is scored after at least one token (end-of-text for none)")
        if len(ctx) + len(cont) > seq_len + 1:
            raise KimbhoError(
                f"{len(ctx)} context + {len(cont)} continuation tokens do not fit the model's context of {seq_len} (+1)"
            )
        if cont:  # an empty continuation has nothing to score
            by_context.setdefault(tuple(ctx), []).append(i)
    groups = []
    for context, members in by_context.items():
        chosen: list[int] = []
        used = len(context) - 1
        for i in members:
            if chosen and used + len(pairs[i][1]) > seq_len:
                groups.append(_Group(context, tuple(chosen), used))
                chosen, used = [], len(context) - 1
            chosen.append(i)
            used += len(pairs[i][1])
        groups.append(_Group(context, tuple(chosen), used))
    return groups


def _pack_groups(
    groups: Sequence[_Group], pairs: Sequence[tuple[list[int], list[int]]], seq_len: int
) -> tuple[np.ndarray, list[dict[int, int]]]:
    """Rows (n, 5, seq_len) of inputs, targets, positions, segments and prefixes (see
    `KimbhoV1Model.features`), best-fit decreasing, and per row the pair index of each branch
    segment."""
    rows = best_fit([g.length for g in groups], seq_len)
    out = np.zeros((len(rows), 5, seq_len), dtype=np.int64)
    out[:, 1] = IGNORE
    owners: list[dict[int, int]] = []
    for r, members in enumerate(rows):
        at, segment, owner = 0, 0, {}
        for g in (groups[m] for m in members):
            query = len(g.context) - 1
            out[r, 0, at : at + query] = g.context[:-1]
            out[r, 2, at : at + query] = np.arange(query)
            out[r, 3:5, at : at + query] = segment
            prefix, at = segment, at + query
            for i in g.members:
                segment += 1
                cont = pairs[i][1]
                n = len(cont)
                out[r, 0, at : at + n] = [g.context[-1], *cont[:-1]]
                out[r, 1, at : at + n] = cont
                out[r, 2, at : at + n] = np.arange(query, query + n)
                out[r, 3, at : at + n] = segment
                out[r, 4, at : at + n] = prefix
                owner[segment] = i
                at += n
            segment += 1
        out[r, 3:5, at:] = segment  # padding: a segment of its own
        out[r, 2, at:] = np.arange(seq_len - at)
        owners.append(owner)
    return out, owners


@torch.no_grad()
def score_tokens(
    model: KimbhoV1Model,
    pairs: Sequence[tuple[list[int], list[int]]],
    top: int = 0,
    progress: Callable[[int], object] | None = None,
) -> list[TokenScores]:
    """The scores of each (context ids, continuation ids) pair's continuation tokens. Pairs are
    packed into rows of the model's context; the pairs of one context share it (computed once,
    each continuation attending to it and to itself only), and the head runs only at the
    continuations' positions. `progress(n)` counts pairs done."""
    seq_len = model.config.max_seq_len
    rows, owners = _pack_groups(_groups(pairs, seq_len), pairs, seq_len)
    device = model.embed.weight.device
    per_pass = max(1, _LOGITS_PER_PASS // (seq_len * model.config.vocab_size))
    scores = [TokenScores([], [], []) for _ in pairs]
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), per_pass):
        chunk = torch.from_numpy(rows[start : start + per_pass]).to(device)
        inputs, targets, positions, segments, prefixes = chunk.unbind(1)
        scored = targets != IGNORE
        hidden = model.features(inputs, positions=positions, segments=segments, prefixes=prefixes)[scored]
        logprobs = torch.log_softmax(model.head(hidden).float(), dim=-1)
        wanted = targets[scored]
        picked = logprobs.gather(-1, wanted.unsqueeze(-1)).squeeze(-1).tolist()
        is_max = (logprobs.argmax(-1) == wanted).tolist()
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        rows_of = scored.nonzero()[:, 0].add(start).tolist()
        # Targets come in order within each row, so each pair's tokens are appended in order.
        for n, (row, segment) in enumerate(zip(rows_of, segments[scored].tolist(), strict=True)):
            s = scores[owners[row][segment]]
            s.logprobs.append(picked[n])
            s.greedy.append(is_max[n])
            if top:
                s.top.append(tops[n])
        if progress is not None:
            progress(sum(len(owners[start + r]) for r in range(chunk.shape[0])))
    model.train(was_training)
    return scores


def score_continuations(
    model: KimbhoV1Model,
    pairs: Sequence[tuple[list[int], list[int]]],
    progress: Callable[[int], object] | None = None,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's log-likelihood given the
    context (nats), and whether greedy decoding would have produced it."""
    return [(sum(s.logprobs), all(s.greedy)) for s in score_tokens(model, pairs, progress=progress)]


def score_multiple_choice(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    items: Sequence[MultipleChoice],
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Accuracy (per-character normalised, as `score`; raw as `acc`), centred accuracy, and the
    log-likelihoods of every choice."""
    pairs, owners = [], []
    limit = model.config.max_seq_len + 1
    for n, item in enumerate(items):
        for choice in item.choices:
            ctx, cont = continuation_ids(tokenizer, item.query, choice)
            if len(ctx) + len(cont) > limit:
                raise KimbhoError(
                    f"{item.where}: the query with its choice {choice[:40]!r} is {len(ctx) + len(cont)} tokens, "
                    f"longer than the model's context of {limit - 1} (+1)"
                )
            if not cont:
                raise KimbhoError(f"{item.where}: the choice {choice!r} adds no token to the query")
            pairs.append((ctx, cont))
            owners.append(n)
    scored = score_continuations(model, pairs, progress)
    loglik: list[list[float]] = [[] for _ in items]
    for n, (value, _) in zip(owners, scored, strict=True):
        loglik[n].append(value)
    right_norm = right_raw = 0
    for item, values in zip(items, loglik, strict=True):
        normalised = [v / len(c) for v, c in zip(values, item.choices, strict=True)]
        right_norm += int(max(range(len(values)), key=normalised.__getitem__) == item.gold)
        right_raw += int(max(range(len(values)), key=values.__getitem__) == item.gold)
    chance = sum(1 / len(i.choices) for i in items) / len(items)
    score = right_norm / len(items)
    return {
        "kind": "multiple_choice",
        "score": score,
        "acc": right_raw / len(items),
        "centered": (score - chance) / (1 - chance) if chance < 1 else math.nan,
        "chance": chance,
        "items": len(items),
        "loglikelihoods": loglik,
    }


# --- generative -------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def score_generative(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    items: Sequence[Generative],
    chat: Any,
    max_new_tokens: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Exact match of the greedy replies, generated together by the engine."""
    from ..inference.engine import Engine, Request
    from ..inference.generation import MAX_SLOTS, encode_prompt

    requests = []
    context = model.config.max_seq_len
    stop_text: tuple[str, ...]
    for item in items:
        if item.messages is not None:
            if chat is None:
                raise KimbhoError(f"{item.where}: chat messages, but the model has no chat format")
            ids, stops, stop_text = chat.encode(list(item.messages)), chat.stop_token_ids, ()
        else:
            assert item.prompt is not None
            eot = (tokenizer.eot_id,) if tokenizer.eot_id is not None else ()
            ids, stops, stop_text = encode_prompt(tokenizer, item.prompt)[0].tolist(), eot, ("\n",)
        if len(ids) >= context:
            raise KimbhoError(
                f"{item.where}: the prompt is {len(ids)} tokens, as long as the model's context ({context})"
            )
        budget = min(max_new_tokens, context - len(ids))
        requests.append(Request(ids, budget, stop_token_ids=stops, stop=stop_text))
    engine = Engine(model, tokenizer, slots=min(len(requests), MAX_SLOTS))
    replies = [""] * len(requests)
    for event in engine.run(requests):
        replies[event.request_id] += event.text
        if event.finish_reason is not None and progress is not None:
            progress(1)
    right = [normalise(r) == normalise(i.answer) for r, i in zip(replies, items, strict=True)]
    return {
        "kind": "generative",
        "score": sum(right) / len(items),
        "centered": sum(right) / len(items),  # chance is 0: an exact answer is not guessed
        "items": len(items),
        "replies": replies,
    }
