"""`kimbho prepare`."""

from __future__ import annotations

import argparse
import logging

from .common import INPUTS_HELP

log = logging.getLogger("kimbho")


def cmd_prepare(args: argparse.Namespace) -> None:
    from ..data.prepare import prepare

    meta = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        force=args.force,
    )
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    report = meta["report"]
    print(
        f"wrote {args.out}: {train['tokens']:,} train / {val['tokens']:,} val tokens, "
        f"{report['documents']:,} documents in {report['files'] or 1} file(s), vocabulary {meta['vocab_size']}"
    )
    if len(meta["sources"]) > 1:
        for name, info in meta["sources"].items():
            print(f"  {name}: {info['train']['tokens']:,} train / {info['val']['tokens']:,} val tokens")
    skipped = len(report["skipped_binary"]) + report["jsonl_missing_field"] + report["jsonl_invalid_lines"]
    if skipped or report["invalid_utf8_files"]:
        print(
            f"  skipped {len(report['skipped_binary'])} binary file(s), {report['jsonl_missing_field']} jsonl line(s) "
            f"without '{args.text_field}', {report['jsonl_invalid_lines']} invalid jsonl line(s); "
            f"{report['replaced_bytes']} invalid UTF-8 byte(s) replaced in {len(report['invalid_utf8_files'])} file(s)"
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prepare", help="tokenize text into token shards for training")
    prep.add_argument("--input", nargs="+", metavar="[NAME=]PATH", help=INPUTS_HELP)
    which = prep.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", metavar="tokenizer.json", help="an existing tokenizer")
    which.add_argument(
        "--vocab-size", type=int, metavar="N", help="train a tokenizer of N tokens on the inputs first"
    )
    prep.add_argument("--out", required=True, metavar="DATA_DIR")
    prep.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="share held out for validation"
    )
    prep.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    prep.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    prep.set_defaults(func=cmd_prepare)
