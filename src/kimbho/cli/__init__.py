"""The `kimbho` command. Each subcommand is a small function over the Python API; heavy imports
happen inside them so `kimbho --help` answers at once. A `KimbhoError` becomes one line on
stderr and exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import KimbhoError, ReportedElsewhere

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
        f"{report['documents']:,} documents from {report['files'] or 1} source(s), vocabulary {meta['vocab_size']}"
    )
    skipped = len(report["skipped_binary"]) + report["jsonl_missing_field"] + report["jsonl_invalid_lines"]
    if skipped or report["invalid_utf8_files"]:
        print(
            f"  skipped {len(report['skipped_binary'])} binary file(s), {report['jsonl_missing_field']} jsonl line(s) "
            f"without '{args.text_field}', {report['jsonl_invalid_lines']} invalid jsonl line(s); "
            f"{report['replaced_bytes']} invalid UTF-8 byte(s) replaced in {len(report['invalid_utf8_files'])} file(s)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import resolve_run_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.init is not None and args.preset is not None:
        raise KimbhoError("--init takes the model config from MODEL; drop --preset")
    run, explicit = resolve_run_config(args.config, args.preset, overrides)
    if args.nproc is not None:
        from ..training.distributed import launch, split_batch

        if args.nproc >= 1:  # what can be checked before starting the processes
            split_batch(run.train.batch_size, run.train.micro_batch_size, args.nproc)
        return launch(args.nproc, _without_option(args.argv, "--nproc"))

    from ..training.trainer import Trainer

    trainer = Trainer(
        run,
        args.data,
        args.out,
        resume=args.resume,
        explicit_keys=explicit,
        init_from=args.init,
        force_resume=args.force_resume,
    )
    if not trainer.world.is_main:
        trainer.fit()  # rank 0 reports
        return 0
    params = trainer.model.num_params()
    processes = (
        f" x {trainer.world.size} processes ({trainer.cfg.parallel})" if trainer.world.size > 1 else ""
    )
    log.info(
        f"training {params / 1e6:.2f}M parameters on {trainer.device}{processes} "
        f"({str(trainer.dtype).removeprefix('torch.')}), "
        f"{trainer.cfg.max_steps} steps of {trainer.cfg.batch_size} x {trainer.seq_len} tokens"
    )
    last = trainer.fit()
    summary = ", ".join(
        f"{k} {v:.4f}"
        for k, v in {**last.get("train", {}), **last.get("eval", {})}.items()
        if k in ("loss", "val_loss", "val_bpb")
    )
    if "stopped_by" in last:
        print(f"stopped {args.out} at step {trainer.progress.step} ({last['stopped_by']}): {summary}")
    else:
        print(f"finished {args.out}: {summary}")
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE` (the train parser takes no abbreviations)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def _load(args: argparse.Namespace, dtype: str | None = None):  # type: ignore[no-untyped-def]
    """The MODEL argument loaded on --device in --dtype (the inference commands' options)."""
    from ..loading import load

    return load(args.model, device=getattr(args, "device", "cpu"), dtype=dtype or args.dtype)


def _sampling_defaults(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """--temperature and --top-p as given; unset, the defaults of `sampling` when sampling, and
    nothing with beam search (which draws nothing and refuses sampling options)."""
    from ..inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

    if args.num_beams > 1:
        return args.temperature, args.top_p
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    return temperature, DEFAULT_TOP_P if args.top_p is None else args.top_p


def cmd_generate(args: argparse.Namespace) -> None:
    from ..inference.generation import stream

    temperature, top_p = _sampling_defaults(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if temperature is None else temperature,
        top_k=args.top_k,
        top_p=top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        num_beams=args.num_beams,
        seed=args.seed,
        stop=args.stop,
        compile=args.compile or None,
    )
    model, tokenizer = _load(args)
    if args.prompt is not None:
        _print_generation(stream(model, tokenizer, args.prompt, **options), args.prompt, args.stream)  # type: ignore[arg-type]
        return
    failed = 0
    for prompt in _stdin_prompts():  # interactive: a bad prompt is reported and the session goes on
        try:
            _print_generation(stream(model, tokenizer, prompt, **options), prompt, args.stream)  # type: ignore[arg-type]
        except KimbhoError as e:
            print(f"kimbho: error: {e}", file=sys.stderr, flush=True)
            failed += 1
    if failed:
        raise KimbhoError(f"{failed} prompt(s) failed (see above)")


def _print_generation(pieces: Iterator[str], prompt: str, streaming: bool) -> None:
    """The prompt and its continuation on one line; piece by piece as they come when streaming."""
    if streaming:
        print(prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    else:
        print(prompt + "".join(pieces), flush=True)


def _stdin_prompts() -> Iterator[str]:
    """Interactive mode: one prompt per line of standard input."""
    if sys.stdin.isatty():
        print("kimbho: type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            yield line.rstrip("\n")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation import evaluate

    model, tokenizer = _load(args)
    print(json.dumps(evaluate(model, tokenizer, args.data, max_tokens=args.max_tokens)))


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
    )


def cmd_export_hf(args: argparse.Namespace) -> None:
    from ..interop.hf import export_hf

    model, tokenizer = _load(args)  # on the CPU: writing a file
    export_hf(model, tokenizer, args.out_dir, force=args.force, max_shard_bytes=args.max_shard_size)
    print(f"wrote {args.out_dir}: a Hugging Face LlamaForCausalLM directory")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from ..interop.gguf import export_gguf

    model, tokenizer = _load(args, dtype="fp32")  # the file's precision is --dtype, converted from fp32
    name = Path(args.model).resolve().name
    export_gguf(model, tokenizer, args.out, dtype=args.dtype, force=args.force, name=name)
    print(f"wrote {args.out}: GGUF ({args.dtype}), llama architecture")


def _byte_size(text: str) -> int:
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


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(minutes=args.minutes, out=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimbho", description="Train, run and serve Llama-style language models, from a folder of text."
    )
    parser.add_argument("--version", action="version", version=f"kimbho {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inputs_help = (
        "text file, directory (recursive), glob or .jsonl; default: the built-in corpus (CPython's docs)"
    )

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a tokenizer on text")
    tok_train.add_argument("--input", nargs="+", metavar="PATH", help=inputs_help)
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="tokenizer.json")
    tok_train.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    tok_train.add_argument("--force", action="store_true", help="overwrite an existing file")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    prep = sub.add_parser("prepare", help="tokenize text into token shards for training")
    prep.add_argument("--input", nargs="+", metavar="PATH", help=inputs_help)
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

    from ..config import config_help

    train = sub.add_parser(
        "train",
        help="train a model",
        allow_abbrev=False,  # --nproc is passed on to torchrun's processes less itself, exactly
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections model: and train:, or key=value on the command line):\n"
        + config_help(),
    )
    train.add_argument("--config", type=Path, metavar="FILE.yaml")
    train.add_argument("--preset", metavar="NAME", help="seed, tiny, small, base or 1b")
    train.add_argument("--data", required=True, metavar="DATA_DIR")
    train.add_argument("--out", required=True, metavar="RUN_DIR")
    train.add_argument("--max-steps", type=int, metavar="N", help="shorthand for train.max_steps=N")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in RUN_DIR (bit-identical to an uninterrupted run)",
    )
    train.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if the model config, tokenizer or dataset differ from the checkpoint's",
    )
    train.add_argument(
        "--init",
        metavar="MODEL",
        help="start from MODEL's weights, config and tokenizer (a run, checkpoint or Hugging Face "
        "directory); DATA_DIR must be prepared with MODEL's tokenizer.json",
    )
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes) with DDP, or FSDP2 "
        "with train.parallel=fsdp: runs torchrun --standalone --nproc-per-node N for you; for several "
        "machines start torchrun yourself (see docs/scaling.md)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="continue a prompt (no --prompt: read prompts from stdin)")
    gen.add_argument(
        "model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory"
    )
    gen.add_argument("--prompt", help="text to continue; empty starts a new document")
    from ..inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    gen.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help=f"0 is greedy (default {DEFAULT_TEMPERATURE})",
    )
    gen.add_argument("--top-k", type=int, default=None, metavar="K")
    gen.add_argument(
        "--top-p", type=float, default=None, metavar="P", help=f"nucleus sampling (default {DEFAULT_TOP_P})"
    )
    gen.add_argument("--min-p", type=float, default=None, metavar="P")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    gen.add_argument("--presence-penalty", type=float, default=0.0, metavar="P", help="OpenAI's, in [-2, 2]")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, metavar="P", help="OpenAI's, in [-2, 2]")
    gen.add_argument(
        "--num-beams",
        type=int,
        default=1,
        metavar="B",
        help="beam search with B beams (deterministic: no temperature, top-k/p, penalties or seed)",
    )
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="same seed, same text")
    gen.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end the text at TEXT (repeatable)"
    )
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step: ~15 s once per process, then ~4x the tokens/s on a CPU",
    )
    _add_inference_options(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out text (one JSON object)")
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument(
        "--data",
        required=True,
        metavar="DATA_DIR|TEXT_FILE",
        help="validation split of a data directory, or a text file",
    )
    ev.add_argument("--max-tokens", type=int, default=None, metavar="N", help="evaluate at most N tokens")
    _add_inference_options(ev)
    ev.set_defaults(func=cmd_eval)

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
    _add_inference_options(srv)
    srv.set_defaults(func=cmd_serve)

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
        type=_byte_size,
        default=None,
        metavar="SIZE",
        help="split the weights into files of at most SIZE, e.g. 500MB (default 5GB)",
    )
    exp_hf.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    _add_inference_options(exp_hf, device=False, dtype_help="precision of the written weights")
    exp_hf.set_defaults(func=cmd_export_hf)
    exp_gguf = export_sub.add_parser("gguf", help="GGUF file for llama.cpp")
    exp_gguf.add_argument("model", metavar="MODEL", help=model_help)
    exp_gguf.add_argument("out", metavar="OUT.gguf")
    exp_gguf.add_argument(
        "--dtype", choices=("f32", "f16", "q8_0"), default="f32", help="matrix storage (default f32)"
    )
    exp_gguf.add_argument("--force", action="store_true", help="replace an existing file")
    exp_gguf.set_defaults(func=cmd_export_gguf)

    demo = sub.add_parser(
        "demo", help="tokenizer, data, training and samples on the built-in corpus, in minutes"
    )
    demo.add_argument("--minutes", type=float, default=3.0, metavar="N", help="training budget (default 3)")
    demo.add_argument("--out", default="runs/demo", metavar="RUN_DIR")
    demo.set_defaults(func=cmd_demo)
    return parser


def _add_inference_options(
    parser: argparse.ArgumentParser, device: bool = True, dtype_help: str = "precision of the weights"
) -> None:
    """--device and --dtype, as every inference command takes them (INTERFACE.md)."""
    from ..device import INFERENCE_DTYPES

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
        choices=INFERENCE_DTYPES,
        help=f"{dtype_help}: auto keeps the checkpoint's where the device computes it natively (default auto)",
    )


def _version() -> str:
    from .. import __version__

    return __version__


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (tests and notebooks replace it)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "kimbho: warning: " if record.levelno >= logging.WARNING else "kimbho: "
        return prefix + record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if int(os.environ.get("RANK", "0")) > 0:
        log.setLevel(logging.ERROR)  # under torchrun rank 0 speaks for all processes
    log.propagate = False
    try:
        code = args.func(args) or 0
    except ReportedElsewhere:
        code = 1
    except KimbhoError as e:
        print(f"kimbho: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("kimbho: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `kimbho generate ... | head`
        code = 0
    if "torch.distributed" in sys.modules:  # only training imports it
        from ..training.distributed import exit_if_in_group

        exit_if_in_group(code)
    return code
