"""Reading raw text: files, directories, globs and `.jsonl`, streamed in bounded pieces.

A text file is one document; each `.jsonl` line is one document (its `text_field`). Documents
are streamed as *sections* of about `SECTION_BYTES`, cut at line ends, so memory stays bounded
however large a file is, and so a corpus that is a single big file can still be split into
training and validation sections. With no input at all, the default corpus is the
documentation that ships inside every CPython (`pydoc_data.topics`): real English prose,
available offline everywhere.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KimbhoError

log = logging.getLogger("kimbho")

SECTION_BYTES = 32 * 1024
_MAX_LINE_BYTES = 1024 * 1024  # a line longer than this is cut (at a character boundary)
_SNIFF_BYTES = 8192


@dataclass
class Section:
    """A piece of a document; `end_of_document` marks its last piece."""

    text: str
    end_of_document: bool


@dataclass
class CorpusReport:
    """What reading the corpus found, for meta.json and the user."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_binary: list[str] = field(default_factory=list)
    invalid_utf8_files: list[str] = field(default_factory=list)
    replaced_bytes: int = 0
    jsonl_missing_field: int = 0
    jsonl_invalid_lines: int = 0


DEFAULT_CORPUS = "python-docs"  # name recorded in meta.json for the built-in corpus


def resolve_inputs(paths: list[str]) -> list[Path]:
    """Expand files, directories (recursively, hidden entries skipped) and globs into a sorted,
    de-duplicated list of files. A path that matches nothing is an error."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            if not found:
                raise KimbhoError(f"input directory {raw} contains no files")
            files.extend(found)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise KimbhoError(f"input path {raw} does not exist (no file, directory or glob match)")
            files.extend(matches)
    unique = list(dict.fromkeys(f.resolve() for f in files))
    return unique


def read_sections(files: list[Path], text_field: str, report: CorpusReport) -> Iterator[Section]:
    """Every document of every file, as sections, counting what was found in `report`."""
    for path in files:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
        if b"\x00" in head:
            log.warning(f"skipping {path}: it looks like a binary file (contains NUL bytes)")
            report.skipped_binary.append(str(path))
            continue
        report.files += 1
        before = report.replaced_bytes
        if path.suffix == ".jsonl":
            yield from _jsonl_sections(path, text_field, report)
        else:
            yield from _text_file_sections(path, report)
        if report.replaced_bytes > before:
            report.invalid_utf8_files.append(str(path))
            log.warning(
                f"{path}: {report.replaced_bytes - before} invalid UTF-8 byte(s) replaced with U+FFFD"
            )


def default_corpus_sections(report: CorpusReport) -> Iterator[Section]:
    """CPython's own documentation topics, one document each."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _split_text(topics[name], report)


def _text_file_sections(path: Path, report: CorpusReport) -> Iterator[Section]:
    decoder = _CountingDecoder(report)
    pending: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        while True:
            line = f.readline(_MAX_LINE_BYTES)
            if not line:
                break
            pending.append(line)
            size += len(line)
            if size >= SECTION_BYTES:
                text = decoder.decode(b"".join(pending))
                report.bytes += len(text.encode())
                yield Section(text, end_of_document=False)
                pending, size = [], 0
    text = decoder.decode(b"".join(pending), final=True)
    report.bytes += len(text.encode())
    report.documents += 1
    yield Section(text, end_of_document=True)


def _jsonl_sections(path: Path, text_field: str, report: CorpusReport) -> Iterator[Section]:
    for _, text in jsonl_texts(path, text_field, report):
        yield from _split_text(text, report)


def jsonl_texts(path: Path, text_field: str, report: CorpusReport) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a `.jsonl` file with a string `text_field`; lines
    without one, or not JSON, are counted in `report` and named in one warning."""
    decoder = _CountingDecoder(report)
    missing = invalid = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            raw = decoder.decode(line, final=True)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                invalid += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                missing += 1
                continue
            yield number, text
    report.jsonl_missing_field += missing
    report.jsonl_invalid_lines += invalid
    if missing or invalid:
        log.warning(
            f"{path}: skipped {missing} line(s) without a string {text_field!r} field "
            f"and {invalid} line(s) of invalid JSON"
        )


def _split_text(text: str, report: CorpusReport) -> Iterator[Section]:
    """A document already in memory, cut into sections at line ends."""
    report.documents += 1
    report.bytes += len(text.encode())
    lines = text.splitlines(keepends=True)
    pending: list[str] = []
    size = 0
    for line in lines:
        pending.append(line)
        size += len(line)
        if size >= SECTION_BYTES:
            yield Section("".join(pending), end_of_document=False)
            pending, size = [], 0
    yield Section("".join(pending), end_of_document=True)


_replaced = [0]  # invalid bytes seen by the "kimbho.count" error handler


def _count_and_replace(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    _replaced[0] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("kimbho.count", _count_and_replace)


class _CountingDecoder:
    """Incremental UTF-8 decoding that replaces invalid bytes with U+FFFD and counts them in the
    report; a character split across two reads is joined, not replaced."""

    def __init__(self, report: CorpusReport) -> None:
        self.report = report
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="kimbho.count")

    def decode(self, data: bytes, final: bool = False) -> str:
        before = _replaced[0]
        text = self._decoder.decode(data, final=final)
        self.report.replaced_bytes += _replaced[0] - before
        return text
