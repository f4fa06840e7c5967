"""`kimbho generate`: one prompt, or prompts read from standard input."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import KimbhoError
from .common import add_inference_options, add_retriever_options, load_model

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer
    from ..inference.chat import ChatFormat
    from ..retrieval.augment import Augmenter

log = logging.getLogger("kimbho")


def _sampling_defaults(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """--temperature and --top-p as given; unset, the defaults of `sampling` when sampling, and
    nothing with beam search (which draws nothing and refuses sampling options)."""
    from ..inference.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

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
    model, tokenizer = load_model(args)
    chat = _chat_format(args, tokenizer) if args.chat or args.system is not None else None
    augmenter = _augmenter(args, tokenizer, chat, model.config.max_seq_len)
    # A chat is one conversation: each prompt is the next user turn, each reply joins it.
    history = [{"role": "system", "content": args.system}] if args.system is not None else []

    def respond(prompt: str) -> None:
        if chat is None:
            seen, passages = augmenter.prompt(prompt, args.max_new_tokens) if augmenter else (prompt, [])
            _print_generation(stream(model, tokenizer, seen, **options), prompt, args.stream)
            _print_sources(passages)
            return
        turn = {"role": "user", "content": prompt}
        messages: list[dict] = [*history, turn]
        passages = []
        if augmenter is not None:
            messages, passages = augmenter.messages(messages, args.max_new_tokens)
        reply = _print_generation(stream(model, tokenizer, messages, chat=chat, **options), "", args.stream)
        _print_sources(passages)
        history.extend([turn, {"role": "assistant", "content": reply}])

    if args.prompt is not None:
        respond(args.prompt)
        return
    failed = 0
    for prompt in _stdin_prompts():  # interactive: a bad prompt is reported and the session goes on
        try:
            respond(prompt)
        except KimbhoError as e:
            print(f"kimbho: error: {e}", file=sys.stderr, flush=True)
            failed += 1
    if failed:
        raise KimbhoError(f"{failed} prompt(s) failed (see above)")


def _augmenter(
    args: argparse.Namespace, tokenizer: Tokenizer, chat: ChatFormat | None, context: int
) -> Augmenter | None:
    """Retrieval for --index (or a plugin retriever that needs no index), else None."""
    if args.index is None and args.retriever == "bm25":
        return None
    from ..retrieval import open_retriever
    from ..retrieval.augment import Augmenter

    return Augmenter(open_retriever(args.index, args.retriever), args.k, tokenizer, chat, context)


def _print_sources(passages: list) -> None:
    """Where the retrieved passages the model was given came from, on stderr (stdout is the text)."""
    if passages:
        where = ", ".join(f"[{n}] {p.source}:{p.start}-{p.end}" for n, p in enumerate(passages, start=1))
        print(f"kimbho: sources: {where}", file=sys.stderr, flush=True)


def _chat_format(args: argparse.Namespace, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format MODEL was trained in (its template, or Kimbho's role tokens)."""
    from ..inference.chat import ChatFormat
    from ..loading import resolve_checkpoint

    chat = ChatFormat.for_model(tokenizer, resolve_checkpoint(args.model))
    if chat is None:
        raise KimbhoError(
            f"{args.model} has no chat format (its tokenizer lacks the role tokens and it has no "
            f"chat_template); drop --chat to continue plain text"
        )
    return chat


def _print_generation(pieces: Iterator[str], prompt: str, streaming: bool) -> str:
    """The prompt and its continuation on one line; piece by piece as they come when streaming.
    Returns the continuation."""
    if streaming:
        print(prompt, end="", flush=True)
        text = ""
        for piece in pieces:
            print(piece, end="", flush=True)
            text += piece
        print()
        return text
    text = "".join(pieces)
    print(prompt + text, flush=True)
    return text


def _stdin_prompts() -> Iterator[str]:
    """Interactive mode: one prompt per line of standard input."""
    if sys.stdin.isatty():
        print("kimbho: type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            yield line.rstrip("\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="continue a prompt (no --prompt: read prompts from stdin)")
    gen.add_argument(
        "model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory"
    )
    gen.add_argument("--prompt", help="text to continue; empty starts a new document")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="the prompt (each line, from stdin: one conversation) is a user message, answered in "
        "the model's chat format; prints the reply",
    )
    gen.add_argument(
        "--system", metavar="TEXT", help="a system message to open the chat with (implies --chat)"
    )
    from ..inference.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

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
        help="wait for the compiled decode step if it is not built yet (by default generation runs "
        "eager while it is built in the background, once per machine and model shape)",
    )
    add_retriever_options(
        gen, "answer from these documents: retrieve passages for the prompt (made by `kimbho index build`)"
    )
    add_inference_options(gen)
    gen.set_defaults(func=cmd_generate)
