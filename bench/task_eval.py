"""Multiple-choice scoring throughput: `kimbho eval --task`'s packed scorer against scoring each
choice alone (one forward pass per query + choice, the loop a first implementation writes), on
the same items, model and machine.

    python bench/task_eval.py [--items 200] [--choices 4] [--data tinyshakespeare.txt]

The loop runs each query + choice at its own length, unpadded. The model is the `small` preset (random weights: the work does not depend on them) with a BPE
trained on the corpus; items are corpus lines as queries and the next line's words (the gold)
among lines drawn elsewhere, as in a cloze task. Both ways give the same log-likelihoods
(checked); the ratio of choices per second is printed. The same items with their gold drawn at
random (a task no model can do better than chance on) check that `centered` is then about 0.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import DEFAULT_CORPUS, RESULTS, cpu_name, model_config, prepared_data, save_results  # noqa: E402

import kimbho  # noqa: E402
from kimbho.evaluation.tasks import MultipleChoice, continuation_ids, score_multiple_choice  # noqa: E402


def items_of(corpus: Path, n: int, choices: int) -> list[MultipleChoice]:
    lines = [line.strip() for line in corpus.read_text().splitlines() if len(line.split()) >= 4]
    rng = random.Random(0)
    out = []
    for i in range(n):
        at = rng.randrange(len(lines) - 1)
        others = [" " + lines[rng.randrange(len(lines))] for _ in range(choices - 1)]
        gold = rng.randrange(choices)
        options = [*others[:gold], " " + lines[at + 1], *others[gold:]]
        out.append(MultipleChoice(lines[at], tuple(options), gold, str(i)))
    return out


@torch.no_grad()
def one_at_a_time(model: kimbho.KimbhoV1Model, ctx: list[int], cont: list[int]) -> float:
    """The loop a first implementation writes: one forward pass over exactly this query and
    choice (no padding), the choice's log-probabilities summed."""
    ids = torch.tensor([[*ctx, *cont]])
    logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, len(ctx) - 1 :]
    return float(logprobs.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = prepared_data(args.data)
    tokenizer = kimbho.Tokenizer.from_file(data / "tokenizer.json")
    model = kimbho.KimbhoV1Model(model_config(tokenizer.vocab_size)).eval()
    items = items_of(args.data, args.items, args.choices)
    pairs = [continuation_ids(tokenizer, i.query, c) for i in items for c in i.choices]

    start = time.perf_counter()
    packed = score_multiple_choice(model, tokenizer, items)
    packed_sec = time.perf_counter() - start
    start = time.perf_counter()
    alone = [one_at_a_time(model, ctx, cont) for ctx, cont in pairs]
    alone_sec = time.perf_counter() - start
    rng = random.Random(1)
    shuffled = [MultipleChoice(i.query, i.choices, rng.randrange(len(i.choices)), i.where) for i in items]
    chance = score_multiple_choice(model, tokenizer, shuffled)
    flat = [v for values in packed["loglikelihoods"] for v in values]
    worst = max(abs(a - b) for a, b in zip(flat, alone, strict=True))
    results = {
        "cpu": cpu_name(),
        "items": len(items),
        "choices": len(pairs),
        "tokens": sum(len(c) + len(q) for q, c in pairs),
        "packed_choices_per_sec": len(pairs) / packed_sec,
        "one_at_a_time_choices_per_sec": len(pairs) / alone_sec,
        "speedup": alone_sec / packed_sec,
        "max_loglik_diff": worst,
        "random_gold_centered": chance["centered"],
    }
    print(
        f"{len(pairs)} choices of {len(items)} items, `small` preset on {results['cpu']}: packed "
        f"{results['packed_choices_per_sec']:.1f} choices/s, one at a time {results['one_at_a_time_choices_per_sec']:.1f}: "
        f"{results['speedup']:.2f}x (log-likelihoods agree to {worst:.1e}); gold drawn at random: "
        f"centered {chance['centered']:+.3f}"
    )
    save_results(RESULTS / "task_eval.json", results)


if __name__ == "__main__":
    main()
