"""`kimbho eval --task`: the scorer's log-likelihoods are the model's loss, packing changes no
score, multiple-choice and generative scores, and bad task lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.data.shards import Batch
from kimbho.evaluation import sum_loss
from kimbho.evaluation.tasks import (
    Generative,
    MultipleChoice,
    continuation_ids,
    score_continuations,
    score_generative,
    score_multiple_choice,
)
from tests.conftest import run_cli

TEXT = "The assert statement is a convenient way to insert debugging assertions into a program."


def _lines(path: Path, items: list[object]) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_a_continuations_log_likelihood_is_the_models_loss_on_its_tokens(trained_run: Path) -> None:
    model, tokenizer = kimbho.load(trained_run)
    ids = tokenizer.encode(TEXT)[: model.config.max_seq_len + 1]
    [(loglik, _)] = score_continuations(model, [(ids[:1], ids[1:])])
    batch = Batch(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    total, count, _ = sum_loss(model, [batch], tokenizer)
    assert count == len(ids) - 1
    assert abs(-loglik - total) / count <= 1e-4


def test_scoring_many_pairs_together_gives_each_the_score_it_gets_alone(trained_run: Path) -> None:
    model, tokenizer = kimbho.load(trained_run)
    rng = random.Random(0)
    words = TEXT.split()
    pairs = [
        continuation_ids(
            tokenizer, " ".join(words[: rng.randint(1, 8)]), " " + " ".join(rng.sample(words, 3))
        )
        for _ in range(30)
    ]
    together = score_continuations(model, pairs)
    for pair, (value, greedy) in zip(pairs, together, strict=True):
        [(alone, alone_greedy)] = score_continuations(model, [pair])
        assert abs(value - alone) < 1e-4 and greedy == alone_greedy


def test_continuations_sharing_a_context_score_as_they_do_alone(trained_run: Path) -> None:
    """The shared query is computed once per row; every continuation still sees exactly its
    query and itself, also when a context has more continuations than one row holds."""
    model, tokenizer = kimbho.load(trained_run)
    rng = random.Random(2)
    words = TEXT.split()
    contexts = [tokenizer.encode(" ".join(words[: rng.randint(1, 10)])) for _ in range(4)]
    pairs = [
        (ctx, tokenizer.encode(" " + " ".join(rng.sample(words, rng.randint(1, 4)))))
        for ctx in contexts
        for _ in range(12)
    ]
    together = score_continuations(model, pairs)
    for pair, (value, greedy) in zip(pairs, together, strict=True):
        [(alone, alone_greedy)] = score_continuations(model, [pair])
        assert abs(value - alone) < 1e-4 and greedy == alone_greedy
    # A context whose continuations overflow one row of the model's context is split over rows.
    ctx = contexts[0]
    long = [
        (ctx, tokenizer.encode(" " + " ".join(rng.sample(words, 6))))
        for _ in range(3 * model.config.max_seq_len // 6)
    ]
    for pair, (value, _) in zip(long, score_continuations(model, long), strict=True):
        assert abs(value - score_continuations(model, [pair])[0][0]) < 1e-4


def test_multiple_choice_finds_the_real_continuation_and_chance_scores_near_zero(trained_run: Path) -> None:
    model, tokenizer = kimbho.load(trained_run)
    from pydoc_data.topics import topics

    sentences = [s.strip() for t in list(topics.values())[:40] for s in t.split(". ") if len(s.split()) > 8]
    rng = random.Random(1)
    real, chance = [], []
    for i, sentence in enumerate(sentences[:60]):
        words = sentence.split()
        query, true = " ".join(words[:5]), " " + " ".join(words[5:8])
        scrambled = " " + " ".join("".join(rng.sample(w, len(w))) for w in words[5:8])
        gold = i % 2
        real.append(
            MultipleChoice(query, (true, scrambled) if gold == 0 else (scrambled, true), gold, str(i))
        )
        # Two scrambles of the same letters: nothing tells them apart but the gold label.
        other = " " + " ".join("".join(rng.sample(w, len(w))) for w in words[5:8])
        chance.append(MultipleChoice(query, (scrambled, other), rng.randint(0, 1), str(i)))
    right = score_multiple_choice(model, tokenizer, real)
    assert right["score"] > 0.8 and right["centered"] > 0.6 and right["chance"] == 0.5
    noise = score_multiple_choice(model, tokenizer, chance)
    assert abs(noise["centered"]) < 0.35


def test_generative_items_are_scored_by_exact_match_of_the_greedy_reply(trained_run: Path) -> None:
    from kimbho.inference.chat import ChatFormat

    model, tokenizer = kimbho.load(trained_run)
    prompts = ["The assert statement", "A list is", "Python"]
    from kimbho.inference.generation import stream

    replies = ["".join(stream(model, tokenizer, p, max_new_tokens=12, stop=["\n"])) for p in prompts]
    # Two answers equal the greedy replies up to case and whitespace; one is wrong.
    items = [
        Generative(p, None, f" {r.upper()}  " if i else "not it", str(i))
        for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
    ]
    result = score_generative(model, tokenizer, items, None, 12)
    assert result["replies"] == replies and result["score"] == pytest.approx(2 / 3)
    messages = ({"role": "user", "content": "Hi"},)
    chat = ChatFormat(tokenizer)
    reply = "".join(stream(model, tokenizer, list(messages), max_new_tokens=12, chat=chat))
    assert (
        score_generative(model, tokenizer, [Generative(None, messages, reply, "c")], chat, 12)["score"] == 1.0
    )


def test_eval_task_prints_a_record_per_task_and_a_summary(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = _lines(
        tmp_path / "mc.jsonl", [{"query": "The assert", "choices": [" statement", " zzqx"], "gold": 0}] * 3
    )
    gen = _lines(
        tmp_path / "gen.jsonl",
        [
            {"prompt": "Python", "answer": "no"},
            {"messages": [{"role": "user", "content": "Hi"}], "answer": "x"},
        ],
    )
    assert run_cli("eval", trained_run, "--task", mc, gen, "--limit", 2) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("task") for r in records[:2]] == [str(mc), str(gen)]
    assert records[0]["items"] == 2 and records[0]["kind"] == "multiple_choice"
    assert records[1]["kind"] == "generative" and records[1]["score"] == 0.0
    assert records[2]["summary"]["tasks"] == 2


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "not JSON"),
        ({"query": "q", "gold": 0}, '"choices" must be a list'),
        ({"query": "q", "choices": [], "gold": 0}, '"choices" is empty'),
        ({"query": "q", "choices": [" a", " b"], "gold": 2}, '"gold" must be the index'),
        ({"prompt": "q"}, "expected"),
        ({"query": "word " * 400, "choices": [" a"], "gold": 0}, "longer than the model's context"),
    ],
)
def test_a_bad_task_line_is_one_line_naming_file_and_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: object, reason: str
) -> None:
    good = {"query": "The assert", "choices": [" statement", " zzqx"], "gold": 0}
    task = _lines(tmp_path / "t.jsonl", [good, line])
    assert run_cli("eval", trained_run, "--task", task) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{task}:2" in err[0] and reason in err[0], err
    if "context" not in reason:  # a line that parses is only found too long when scored
        assert run_cli("eval", trained_run, "--task", task, "--skip-bad") == 0
        assert json.loads(capsys.readouterr().out.splitlines()[0])["skipped"] == 1
