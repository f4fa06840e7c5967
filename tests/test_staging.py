"""Outputs complete or absent (`staging`): `prepare --force` killed with SIGKILL at each point of
replacing an existing data directory leaves the old data or the new data whole, and the next run
cleans up what the killed one left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import kimbho
from kimbho.data.shards import TokenStream

# Runs `prepare --force` over OUT in a process that kills itself at one point of the replacement.
KILLED_PREPARE = """
import os, signal, sys
import kimbho.storage.staging as staging
point, corpus, out = sys.argv[1:4]
if point == "before-swap":
    staging.swap = lambda new, out: os.kill(os.getpid(), signal.SIGKILL)
elif point == "between-renames":  # the path taken where the kernel cannot exchange two names
    staging._exchange = lambda a, b: False
    replace = os.replace
    def kill_after_moving_the_old_away(src, dst):
        replace(src, dst)
        if str(src) == out:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = kill_after_moving_the_old_away
elif point == "before-removing-the-old":
    staging._remove = lambda path: os.kill(os.getpid(), signal.SIGKILL)
from kimbho.cli import main
main(["-q", "prepare", "--input", corpus, "--vocab-size", "300", "--out", out, "--force"])
"""


def _corpus(path: Path, word: str) -> Path:
    path.mkdir()
    for i in range(5):
        (path / f"{i}.txt").write_text(f"{word} number {i}. " * 200)
    return path


def _whole(data: Path) -> str:
    """Which corpus the data directory holds, after checking every shard loads."""
    meta = json.loads((data / "meta.json").read_text())
    for split in ("train", "val"):
        stream = TokenStream(data, split)
        assert len(stream) == meta["splits"][split]["tokens"]
    tok = kimbho.Tokenizer.from_file(data / "tokenizer.json")
    return "old" if "apple" in tok.decode(TokenStream(data, "train").window(0, 50).tolist()) else "new"


@pytest.mark.parametrize(
    ("point", "holds"),
    [("before-swap", "old"), ("between-renames", "old"), ("before-removing-the-old", "new")],
)
def test_prepare_force_killed_while_replacing(point: str, holds: str, tmp_path: Path) -> None:
    out = tmp_path / "data"
    kimbho.prepare([str(_corpus(tmp_path / "old", "apple"))], out, vocab_size=300)
    new = _corpus(tmp_path / "new", "banana")
    r = subprocess.run(
        [sys.executable, "-c", KILLED_PREPARE, point, str(new), str(out)], capture_output=True, text=True
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = sorted(p.name for p in tmp_path.glob(".data.*"))
    assert left, "the kill left a temporary behind"
    if point != "between-renames":  # there the old data sits whole under .data.old-PID
        assert _whole(out) == holds
    # The next run writing the same output puts things right, then does its own work.
    kimbho.prepare([str(new)], out, vocab_size=300, force=True)
    assert _whole(out) == "new" and not list(tmp_path.glob(".data.*"))


def test_a_run_killed_mid_swap_gets_its_old_data_back(tmp_path: Path) -> None:
    """Killed between renaming the old output away and renaming the new one in: the old data
    is put back by the next command that writes there, before it decides anything."""
    out = tmp_path / "data"
    kimbho.prepare([str(_corpus(tmp_path / "old", "apple"))], out, vocab_size=300)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_PREPARE,
            "between-renames",
            str(_corpus(tmp_path / "new", "banana")),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == -signal.SIGKILL and not out.exists()
    with pytest.raises(kimbho.KimbhoError, match="exists and is not empty"):
        kimbho.prepare([str(tmp_path / "new")], out, vocab_size=300)  # no --force: the old data is back
    assert _whole(out) == "old"
