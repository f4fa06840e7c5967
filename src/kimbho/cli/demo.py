"""`kimbho demo`: the whole pipeline on the built-in corpus, in minutes (see `kimbho.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(minutes=args.minutes, out=Path(args.out))


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="tokenizer, data, training and samples on the built-in corpus, in minutes"
    )
    demo.add_argument("--minutes", type=float, default=3.0, metavar="N", help="training budget (default 3)")
    demo.add_argument("--out", default="runs/demo", metavar="RUN_DIR")
    demo.set_defaults(func=cmd_demo)
