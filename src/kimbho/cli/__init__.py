"""The `kimbho` command. Each subcommand is a small function over the Python API; heavy imports
happen inside them so `kimbho --help` answers at once. A `KimbhoError` becomes one line on
stderr and exit status 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import KimbhoError, ReportedElsewhere
from . import demo, evaluate, export, finetune, generate, index, prepare, serve, tokenizer, train

# One module per command, each with its `add_parser`; listed in the order `--help` shows them.
COMMANDS = (tokenizer, prepare, train, finetune, generate, evaluate, index, serve, export, demo)

log = logging.getLogger("kimbho")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimbho", description="Train, run and serve Llama-style language models, from a folder of text."
    )
    parser.add_argument("--version", action="version", version=f"kimbho {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "kimbho: warning: " if record.levelno >= logging.WARNING else "kimbho: "
        return prefix + record.getMessage()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a command's positionals in one go: `finetune MODEL --data F key=value`
    # leaves the key=value after the options over. Commands with overrides take them anyway.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
