"""`kimbho eval`."""

from __future__ import annotations

import argparse
import json
import logging

from ..errors import KimbhoError
from .common import add_inference_options, load_model

log = logging.getLogger("kimbho")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation import evaluate

    if args.task:
        _eval_tasks(args)
        return
    model, tokenizer = load_model(args)
    print(json.dumps(evaluate(model, tokenizer, args.data, max_tokens=args.max_tokens)))


def _eval_tasks(args: argparse.Namespace) -> None:
    """One JSON object per task file, then a summary. Every file is read and its lines checked
    before the model runs; a query too long for the context is found when its task is scored."""
    from pathlib import Path

    from tqdm import tqdm

    from ..evaluation.tasks import MultipleChoice, read_task, score_generative, score_multiple_choice
    from ..inference.chat import ChatFormat
    from ..loading import resolve_checkpoint

    if args.limit is not None and args.limit < 1:
        raise KimbhoError(f"--limit must be at least 1, got {args.limit}")
    tasks = {}
    for name in args.task:
        items, bad = read_task(Path(name), skip_bad=args.skip_bad)
        if bad:
            log.warning(f"{name}: left out {len(bad)} bad line(s), the first: {bad[0]}")
        tasks[name] = (items[: args.limit], len(bad))
    model, tokenizer = load_model(args)
    chat = ChatFormat.for_model(tokenizer, resolve_checkpoint(args.model))
    scores = []
    for name, (items, skipped) in tasks.items():
        multiple = isinstance(items[0], MultipleChoice)
        total = sum(len(i.choices) if isinstance(i, MultipleChoice) else 1 for i in items)
        # Shown after a second: a task that fails at once (a query too long for the context) or
        # finishes at once prints no bar.
        unit = "choice" if multiple else "item"
        with tqdm(total=total, desc=Path(name).stem, unit=unit, leave=False, delay=1) as bar:
            if multiple:
                result = score_multiple_choice(model, tokenizer, items, bar.update)  # type: ignore[arg-type]
                result.pop("loglikelihoods")
            else:
                result = score_generative(model, tokenizer, items, chat, args.max_new_tokens, bar.update)  # type: ignore[arg-type]
                result.pop("replies")
        record = {"task": name, **result, "skipped": skipped}
        print(json.dumps(record), flush=True)
        scores.append(record)
    print(
        json.dumps(
            {
                "summary": {
                    "tasks": len(scores),
                    "mean_score": sum(r["score"] for r in scores) / len(scores),
                    "mean_centered": sum(r["centered"] for r in scores) / len(scores),
                }
            }
        )
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte on held-out text, or scores on task files (JSON)"
    )
    ev.add_argument("model", metavar="MODEL")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data",
        metavar="DATA_DIR|TEXT_FILE",
        help="validation split of a data directory, or a text file",
    )
    what.add_argument(
        "--task",
        nargs="+",
        action="extend",
        metavar="TASK.jsonl",
        help="task files: multiple choice (query, choices, gold) or generative (prompt or messages, answer)",
    )
    ev.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score the first N items of each task"
    )
    ev.add_argument(
        "--skip-bad", action="store_true", help="leave out bad task lines (counted) instead of stopping"
    )
    ev.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="longest generative reply (default 64)"
    )
    ev.add_argument("--max-tokens", type=int, default=None, metavar="N", help="evaluate at most N tokens")
    add_inference_options(ev)
    ev.set_defaults(func=cmd_eval)
