"""Exports appear complete or not at all: everything is written into a temporary sibling of the
destination and renamed into place only once it is whole. An existing destination is replaced
only when the user passed `--force` (an empty directory counts as free)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import KimbhoError


@contextmanager
def staged_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block finishes without error it becomes `out`."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise KimbhoError(f"{out} exists and is not a directory; choose another output directory")
        if any(out.iterdir()) and not force:
            raise KimbhoError(
                f"output directory {out} exists and is not empty; choose another or pass --force"
            )
    tmp = _temporary_sibling(out)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `out`; when the block finishes without error it becomes `out`."""
    out = Path(out)
    if out.is_dir():
        raise KimbhoError(f"{out} is a directory; give the path of the file to write")
    if out.exists() and not force:
        raise KimbhoError(f"{out} already exists; choose another path or pass --force")
    tmp = _temporary_sibling(out)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary_sibling(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.is_dir():
        shutil.rmtree(tmp)  # left by an earlier export that was killed
    return tmp
