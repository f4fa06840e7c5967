"""`kimbho tokenizer train`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import KimbhoError
from .common import INPUTS_HELP

log = logging.getLogger("kimbho")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from ..data.prepare import CorpusSource
    from ..data.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and not args.force:
        raise KimbhoError(f"{out} already exists; choose another --out or pass --force")
    tokenizer = Tokenizer.train(
        CorpusSource(args.input, args.text_field).texts(), args.vocab_size, show_progress=True
    )
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.vocab_size} tokens")


def add_parser(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a tokenizer on text")
    tok_train.add_argument("--input", nargs="+", metavar="PATH", help=INPUTS_HELP)
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="tokenizer.json")
    tok_train.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    tok_train.add_argument("--force", action="store_true", help="overwrite an existing file")
    tok_train.set_defaults(func=cmd_tokenizer_train)
