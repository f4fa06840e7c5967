"""`kimbho serve`."""

from __future__ import annotations

import argparse
import logging

from .common import add_inference_options, add_retriever_options

log = logging.getLogger("kimbho")


def cmd_serve(args: argparse.Namespace) -> None:
    from ..serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        slots=args.slots,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_len=args.max_len,
        device=args.device,
        dtype=args.dtype,
        index=args.index,
        retriever=args.retriever,
        k=args.k,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with a playground page (needs kimbho[serve])"
    )
    srv.add_argument(
        "model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory"
    )
    srv.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)"
    )
    srv.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    srv.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $KIMBHO_API_KEY)",
    )
    srv.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="model id in the API (default: MODEL's folder name)",
    )
    srv.add_argument(
        "--slots", type=int, default=8, metavar="N", help="sequences decoded together (default 8)"
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot before 429 (default 64)",
    )
    srv.add_argument(
        "--timeout", type=float, default=600.0, metavar="S", help="seconds a request may take (default 600)"
    )
    srv.add_argument(
        "--max-len",
        type=int,
        default=None,
        metavar="N",
        help="tokens per slot, prompt + output (default: the context, at most 8192)",
    )
    add_retriever_options(
        srv,
        "answer chat from these documents: retrieve for the last user message (made by `kimbho index build`)",
    )
    add_inference_options(srv)
    srv.set_defaults(func=cmd_serve)
