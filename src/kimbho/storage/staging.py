"""Outputs that appear complete or not at all: data directories (`prepare`), tokenizer files,
exports. Everything is written into a temporary sibling of the destination, `.NAME.tmp-PID`, and
renamed into place only once it is whole. An existing destination (replaced only when the user
passed `--force`; an empty directory counts as free) is first renamed to `.NAME.old-PID`, so that
at every instant the destination holds the old output or the new one, whole.

A process killed midway leaves those siblings behind; the next run writing the same destination
removes them, and puts back an old output that was renamed away but not yet replaced.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import KimbhoError

log = logging.getLogger("kimbho")


@contextmanager
def staged_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block finishes without error it becomes `out`."""
    out = Path(out)
    check_directory_free(out, force)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_directory_free(out: Path, force: bool) -> None:
    """Refuse an output directory that holds something, unless `force`; call it before long work
    (it also recovers what a killed run left, which may put an old output back)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    if out.exists():
        if not out.is_dir():
            raise KimbhoError(f"{out} exists and is not a directory; choose another output directory")
        if any(out.iterdir()) and not force:
            raise KimbhoError(
                f"output directory {out} exists and is not empty; choose another or pass --force"
            )


@contextmanager
def staged_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `out`; when the block finishes without error it becomes `out`
    (one rename: a file is replaced atomically)."""
    out = Path(out)
    if out.is_dir():
        raise KimbhoError(f"{out} is a directory; give the path of the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    if out.exists() and not force:
        raise KimbhoError(f"{out} already exists; choose another path or pass --force")
    tmp = _sibling(out, "tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def swap(new: Path, out: Path) -> None:
    """Put the complete directory `new` in place of `out`. Where the kernel can (Linux's
    renameat2 with RENAME_EXCHANGE) the two trade places in one atomic step; elsewhere an existing
    `out` is renamed away first and removed last, so a crash between the two renames leaves the
    old output whole under its `.old-PID` name, for `recover` to put back."""
    old = _sibling(out, "old")
    if out.exists() and _exchange(new, out):
        os.replace(new, old)  # `new` now names the old output
        _remove(old)
        return
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    _remove(old)


def recover(out: Path) -> None:
    """Clean up after processes that were killed while writing `out`: remove their temporaries,
    and restore an old output that one of them had renamed away but not yet replaced. Siblings of
    a process still running are left alone (it may be writing them now)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    for sibling in sorted(out.parent.glob(f".{out.name}.*-*")):
        match = pattern.match(sibling.name)
        if not match or _running(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists():
            os.replace(sibling, out)
            log.warning(f"restored {out}: a run killed while replacing it had renamed it to {sibling.name}")
        else:
            log.warning(f"removing {sibling}, left by a run that was killed while writing {out}")
            _remove(sibling)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b`; False where the system cannot (not Linux, an old
    C library, a file system without RENAME_EXCHANGE)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftovers (a failed earlier attempt) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
