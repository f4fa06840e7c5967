"""`kimbho index build / add / search`."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from .common import add_retriever_options

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer


def _tokenizer(args: argparse.Namespace) -> Tokenizer | None:
    if not args.tokenizer:
        return None
    from ..loading import load_tokenizer  # imports PyTorch (a MODEL's checkpoint): only when asked

    return load_tokenizer(args.tokenizer)


def cmd_index_build(args: argparse.Namespace) -> None:
    from ..retrieval.index import build_index

    start = time.perf_counter()
    found = build_index(
        args.input, args.out, _tokenizer(args), args.chunk_tokens, args.text_field, args.force
    )
    print(json.dumps({"index": args.out, **found, "seconds": round(time.perf_counter() - start, 3)}))


def cmd_index_add(args: argparse.Namespace) -> None:
    from ..retrieval.index import add_to_index

    print(json.dumps({"index": args.index, **add_to_index(args.index, args.input, args.text_field)}))


def cmd_index_search(args: argparse.Namespace) -> None:
    from ..retrieval import open_retriever

    for passage in open_retriever(args.index, args.retriever).search(args.query, args.k):
        print(json.dumps(passage.as_dict(), ensure_ascii=False))


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..retrieval.index import DEFAULT_CHUNK_TOKENS

    index = sub.add_parser("index", help="a full-text index of your documents, for retrieval (--index)")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    def inputs(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input",
            nargs="+",
            required=True,
            metavar="PATH",
            help="text file, directory (recursive), glob or .jsonl",
        )
        parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")

    build = actions.add_parser("build", help="index documents into a new index directory")
    inputs(build)
    build.add_argument(
        "--tokenizer",
        metavar="TOKENIZER|MODEL",
        help="size chunks in this tokenizer's tokens: a tokenizer.json, or the MODEL that will read them "
        "(default: 4 bytes a token)",
    )
    build.add_argument("--out", required=True, metavar="INDEX_DIR")
    build.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        metavar="N",
        help=f"tokens per chunk at most (default {DEFAULT_CHUNK_TOKENS})",
    )
    build.add_argument("--force", action="store_true", help="replace an existing index")
    build.set_defaults(func=cmd_index_build)

    add = actions.add_parser(
        "add",
        help="index more documents, chunked as the index's first ones, without rebuilding (sources already there are skipped)",
    )
    add.add_argument("index", metavar="INDEX_DIR")
    inputs(add)
    add.set_defaults(func=cmd_index_add)

    search = actions.add_parser("search", help="the best passages for a query, as JSON lines")
    search.add_argument("index", metavar="INDEX_DIR")
    search.add_argument("--query", required=True, metavar="TEXT")
    add_retriever_options(search)
    search.set_defaults(func=cmd_index_search)
