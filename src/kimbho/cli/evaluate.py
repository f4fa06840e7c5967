"""`kimbho eval`."""

from __future__ import annotations

import argparse
import json
import logging

from .common import add_inference_options, load_model

log = logging.getLogger("kimbho")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation import evaluate

    model, tokenizer = load_model(args)
    print(json.dumps(evaluate(model, tokenizer, args.data, max_tokens=args.max_tokens)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out text (one JSON object)")
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument(
        "--data",
        required=True,
        metavar="DATA_DIR|TEXT_FILE",
        help="validation split of a data directory, or a text file",
    )
    ev.add_argument("--max-tokens", type=int, default=None, metavar="N", help="evaluate at most N tokens")
    add_inference_options(ev)
    ev.set_defaults(func=cmd_eval)
