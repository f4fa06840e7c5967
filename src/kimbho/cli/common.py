"""What the commands share: the inference options (--device, --dtype) and loading MODEL with them."""

from __future__ import annotations

import argparse


def load_model(args: argparse.Namespace, dtype: str | None = None):
    """The MODEL argument loaded on --device in --dtype (the inference commands' options)."""
    from ..loading import load

    return load(args.model, device=getattr(args, "device", "cpu"), dtype=dtype or args.dtype)


def add_inference_options(
    parser: argparse.ArgumentParser,
    device: bool = True,
    dtype_help: str = "precision of the weights (int8: weight-only quantization)",
    dtypes: tuple[str, ...] | None = None,
) -> None:
    """--device and --dtype, as every inference command takes them (INTERFACE.md); `dtypes`
    narrows the choices (a written file takes no int8)."""
    from ..inference.defaults import INFERENCE_DTYPES

    if device:
        parser.add_argument(
            "--device",
            default="auto",
            metavar="DEVICE",
            help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps (default auto)",
        )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=dtypes or INFERENCE_DTYPES,
        help=f"{dtype_help}: auto keeps the checkpoint's where the device computes it natively (default auto)",
    )


# The inputs of `tokenizer train` and `prepare`.
INPUTS_HELP = (
    "text file, directory (recursive), glob or .jsonl, each a named source as NAME=PATH (a plain "
    "PATH is named after its file or folder); default: the built-in corpus (CPython's docs)"
)


def add_retriever_options(parser: argparse.ArgumentParser, index_help: str | None = None) -> None:
    """--k and --retriever (and, given `index_help`, --index): retrieval as `generate`, `serve`,
    `finetune` and `index search` take it."""
    from ..retrieval import DEFAULT_K, DEFAULT_RETRIEVER

    if index_help is not None:
        parser.add_argument("--index", metavar="INDEX_DIR", help=index_help)
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, metavar="K", help=f"passages to retrieve (default {DEFAULT_K})"
    )
    parser.add_argument(
        "--retriever",
        default=DEFAULT_RETRIEVER,
        metavar="NAME",
        help=f"{DEFAULT_RETRIEVER} (the index's BM25, default) or a plugin's, from the kimbho.retrievers entry points",
    )
