"""Train in a subprocess and signal it at a chosen point: the fault injection of test_crash_resume.py.

    python tests/crash_driver.py RUN.json DATA_DIR RUN_DIR [--resume] [--at WHEN:TARGET:N[:REGEX]]
                                 [--signal KILL|TERM|INT] [--init MODEL]

RUN.json holds `RunConfig.to_dict()`. `--at before:torch.save:2` wraps the function `torch.save`
(any dotted path: `os.replace`, `kimbho.training.trainer.Trainer.save`, ...) so that its 2nd call sends the
signal to this process just before it runs (`after`: just after it returns). With a REGEX, only
calls whose arguments (as strings, joined by spaces) match it are counted. SIGKILL ends the
process on the spot, as `kill -9` or the out-of-memory killer would; nothing in Kimbho knows.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
import signal
from typing import Any


def _owner_and_name(target: str) -> tuple[Any, str]:
    """`"kimbho.training.trainer.Trainer.save"` -> (the Trainer class, "save")."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:-1]:
            owner = getattr(owner, attribute)
        return owner, parts[-1]
    raise SystemExit(f"cannot import {target}")


def inject(point: str, sig: signal.Signals) -> None:
    when, target, count, *pattern = point.split(":", 3)
    matches = re.compile(pattern[0]).search if pattern else lambda text: True
    if when not in ("before", "after"):
        raise SystemExit(f"--at must start with before: or after:, got {point}")
    owner, name = _owner_and_name(target)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += bool(matches(" ".join(map(str, args))))
        hit = calls == int(count)
        if when == "before" and hit:
            os.kill(os.getpid(), sig)
        result = original(*args, **kwargs)
        if when == "after" and hit:
            os.kill(os.getpid(), sig)
        return result

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--at", metavar="WHEN:TARGET:N")
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"])
    parser.add_argument("--init", metavar="MODEL", help="fine-tune MODEL (the Trainer's init_from)")
    args = parser.parse_args()

    from kimbho.config import RunConfig
    from kimbho.training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="kimbho: %(message)s")
    if args.at:
        inject(args.at, signal.Signals[f"SIG{args.signal}"])
    with open(args.config) as f:
        run = RunConfig.from_dict(json.load(f))
    Trainer(run, args.data, args.out, resume=args.resume, progress_bar=False, init_from=args.init).fit()


if __name__ == "__main__":
    main()
