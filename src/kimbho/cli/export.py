"""`kimbho export hf` and `kimbho export gguf`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..inference.defaults import FILE_DTYPES
from .common import add_inference_options, load_model

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer

log = logging.getLogger("kimbho")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from ..interop.hf import export_hf

    if args.adapter:
        _export_adapter(args)
        return
    model, tokenizer = load_model(args)  # on the CPU: writing a file
    export_hf(
        model,
        tokenizer,
        args.out_dir,
        force=args.force,
        max_shard_bytes=args.max_shard_size,
        chat_template=_chat_template(args.model, tokenizer),
    )
    print(f"wrote {args.out_dir}: a Hugging Face LlamaForCausalLM directory")


def _export_adapter(args: argparse.Namespace) -> None:
    """`export hf --adapter`: a LoRA run's adapters alone, as PEFT reads them."""
    from safetensors.torch import load_file

    from ..errors import KimbhoError
    from ..interop.hf import export_peft_adapter
    from ..loading import read_adapter_config, resolve_checkpoint
    from ..storage.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_model_config, verify

    ckpt = resolve_checkpoint(args.model)
    if not (ckpt / ADAPTER_CONFIG).is_file():
        raise KimbhoError(
            f"{args.model} is not a LoRA run (no {ADAPTER_CONFIG}); export it without --adapter"
        )
    verify(ckpt)
    adapter = read_adapter_config(ckpt)
    base = adapter["base"]["path"]
    export_peft_adapter(
        load_file(str(ckpt / ADAPTER_WEIGHTS)),
        read_model_config(ckpt),
        adapter["rank"],
        adapter["alpha"],
        base,
        args.out_dir,
        force=args.force,
    )
    print(
        f"wrote {args.out_dir}: a PEFT LoRA adapter; load it onto the Hugging Face export of its base "
        f"(kimbho export hf {base} BASE_DIR)"
    )


def _chat_template(model: str, tokenizer: Tokenizer) -> str | None:
    """The model's chat format as Jinja for other runtimes (None: it has none)."""
    from ..inference.chat import ChatFormat
    from ..loading import resolve_checkpoint

    chat = ChatFormat.for_model(tokenizer, resolve_checkpoint(model))
    return chat.jinja if chat is not None else None


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from ..interop.gguf import export_gguf

    model, tokenizer = load_model(args, dtype="fp32")  # the file's precision is --dtype, converted from fp32
    name = Path(args.model).resolve().name
    export_gguf(
        model,
        tokenizer,
        args.out,
        dtype=args.dtype,
        force=args.force,
        name=name,
        chat_template=_chat_template(args.model, tokenizer),
    )
    print(f"wrote {args.out}: GGUF ({args.dtype}), llama architecture")


def byte_size(text: str) -> int:
    """Bytes from "500MB", "5GB" or a plain number (decimal units, as Hugging Face counts)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    unit = next((u for u in units if upper.endswith(u)), "B")
    try:
        size = int(float(upper.removesuffix(unit)) * units[unit])
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 5GB, got {text!r}")
    return size


def add_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file")
    export_sub = export.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    model_help = "run directory, checkpoint directory or Hugging Face directory"
    exp_hf = export_sub.add_parser(
        "hf", help="Hugging Face LlamaForCausalLM directory (transformers loads it offline)"
    )
    exp_hf.add_argument("model", metavar="MODEL", help=model_help)
    exp_hf.add_argument("out_dir", metavar="OUT_DIR")
    exp_hf.add_argument(
        "--max-shard-size",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="split the weights into files of at most SIZE, e.g. 500MB (default 5GB)",
    )
    exp_hf.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    exp_hf.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters alone, as a PEFT adapter directory (default: merged into the base)",
    )
    add_inference_options(
        exp_hf, device=False, dtype_help="precision of the written weights", dtypes=FILE_DTYPES
    )
    exp_hf.set_defaults(func=cmd_export_hf)
    exp_gguf = export_sub.add_parser("gguf", help="GGUF file for llama.cpp")
    exp_gguf.add_argument("model", metavar="MODEL", help=model_help)
    exp_gguf.add_argument("out", metavar="OUT.gguf")
    exp_gguf.add_argument(
        "--dtype", choices=("f32", "f16", "q8_0"), default="f32", help="matrix storage (default f32)"
    )
    exp_gguf.add_argument("--force", action="store_true", help="replace an existing file")
    exp_gguf.set_defaults(func=cmd_export_gguf)
