"""`kimbho tokenizer train` and `kimbho tokenizer report`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import KimbhoError
from .common import INPUTS_HELP

log = logging.getLogger("kimbho")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from ..data.sources import CorpusSource
    from ..data.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and not args.force:
        raise KimbhoError(f"{out} already exists; choose another --out or pass --force")
    source = CorpusSource(args.input, args.text_field)
    texts = source.texts() if args.no_balance else source.balanced_texts()
    tokenizer = Tokenizer.train(texts, args.vocab_size, show_progress=True)
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size} tokens")


def cmd_tokenizer_report(args: argparse.Namespace) -> None:
    from ..data.sources import CorpusSource, poor_fits, tokenizer_report
    from ..loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rows = tokenizer_report(tokenizer, CorpusSource(args.input, args.text_field))
    for row in rows:
        print(json.dumps(row), flush=True)
    for warning in poor_fits({r["source"]: (r["bytes"], r["tokens"]) for r in rows}):
        log.warning(warning)


def add_parser(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or report how it fits text")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a tokenizer on text")
    tok_train.add_argument("--input", nargs="+", metavar="[NAME=]PATH", help=INPUTS_HELP)
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="tokenizer.json")
    tok_train.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    tok_train.add_argument(
        "--no-balance",
        action="store_true",
        help="train on the sources as they are (default: each weighs as much as the largest)",
    )
    tok_train.add_argument("--force", action="store_true", help="overwrite an existing file")
    tok_train.set_defaults(func=cmd_tokenizer_train)
    tok_report = tok_sub.add_parser(
        "report", help="bytes per token and tokens per word of each source (JSON lines)"
    )
    tok_report.add_argument(
        "--tokenizer", required=True, metavar="tokenizer.json|MODEL", help="a tokenizer, or a model's"
    )
    tok_report.add_argument("--input", nargs="+", required=True, metavar="[NAME=]PATH", help=INPUTS_HELP)
    tok_report.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    tok_report.set_defaults(func=cmd_tokenizer_report)
