"""The document index (`kimbho index build / add / search`): chunks of the user's documents in
SQLite's FTS5 full-text engine (Python's standard library), ranked by BM25.

    INDEX_DIR/index.sqlite
        meta(key, value)                      format version, chunk size, the chunking tokenizer
        chunks(id, source, start, end, text)  the chunks as read, with where they came from
        sources(source, chunks)               what has been indexed, so `add` skips a repeat
        terms(body)                           FTS5 over each chunk's normalised text (rowid = id)

Chunks follow the documents' paragraphs and lines: lines are gathered into a chunk until the
next would take it past `chunk_tokens` (counted with the tokenizer the index was built for), and
a chunk ends at a blank line rather than mid-paragraph when that leaves it at least half full; a
line longer than a chunk is cut between words. `start`/`end` are character offsets into the
document's text (a text file's content, or a `.jsonl` line's text field, whose source is
`PATH:LINE`).

Indexing and queries go through one normalisation (`normalise`, then FTS5's `unicode61`
tokenizer): Unicode NFKC, case folded, accents removed ("creme" finds "crème"), and every CJK
character a term of its own (those scripts write no spaces, so a word is not otherwise findable
inside a sentence). A query becomes an OR of its terms, quoted, so no user text is read
as FTS5 syntax.

Complete or absent: `build` writes into a staging directory renamed into place when whole
(`storage/staging.py`); `add` is one SQLite transaction, so a killed `add` leaves the index as it
was (SQLite rolls the journal back on the next open).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.corpus import CorpusReport, jsonl_texts, resolve_inputs
from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError

log = logging.getLogger("kimbho")

FORMAT = 1
INDEX_FILE = "index.sqlite"
DEFAULT_CHUNK_TOKENS = 128
BYTES_PER_TOKEN = 4  # the estimate used to size chunks when no tokenizer is given
_BATCH = 2048  # chunks per executemany

# Scripts written without spaces between words: each character is made a term.
_CJK = re.compile(
    "([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff])"
)
_TERM = re.compile(r"[^\W_]+")  # letters and digits: what FTS5's unicode61 keeps as a term


def normalise(text: str) -> str:
    """The text as both the index and queries see it (see the module docstring)."""
    if text.isascii():  # NFKC leaves ASCII as it is, and it holds no CJK
        return text.lower()
    return _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).casefold())


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query, in order, as the index holds them (accents removed)."""
    return list(dict.fromkeys(_TERM.findall(_fold(normalise(text)))))


@dataclass(frozen=True)
class Passage:
    """A chunk found for a query: its text, where it came from, and its BM25 score (higher is
    better; comparable within one query only)."""

    text: str
    source: str
    start: int
    end: int
    score: float

    def as_dict(self) -> dict[str, object]:
        return {
            "score": self.score,
            "source": self.source,
            "start": self.start,
            "end": self.end,
            "text": self.text,
        }


@dataclass(frozen=True)
class Document:
    """A document's text, or (for a large text file) a part of it starting at character
    `offset`; the parts of a file come in order, and chunks never cross them."""

    source: str
    text: str
    offset: int = 0


SECTION_CHARS = 1 << 20  # a text file is read in parts of about this size, cut at line ends


def read_documents(inputs: Sequence[str], text_field: str = "text") -> Iterator[Document]:
    """The documents of `inputs`, read as `prepare` reads them (files, directories, globs,
    `.jsonl`), a bounded part at a time; invalid UTF-8 is replaced, binary files and bad JSONL
    lines are skipped, saying so."""
    for path in resolve_inputs(list(inputs)):
        with path.open("rb") as f:
            if b"\x00" in f.read(8192):
                log.warning(f"skipping {path}: it looks like a binary file (contains NUL bytes)")
                continue
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
            continue
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            offset = 0
            while True:
                part = f.read(SECTION_CHARS)
                part += f.readline() if part and not part.endswith("\n") else ""  # end at a line end
                if part or offset == 0:
                    yield Document(str(path), part, offset)
                if not part:
                    break
                offset += len(part)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    for number, text in jsonl_texts(path, text_field, CorpusReport()):
        yield Document(f"{path}:{number}", text)


def bytes_per_token(tokenizer: Tokenizer | None, documents: Sequence[Document]) -> float:
    """How many UTF-8 bytes a token of `tokenizer` covers on (a sample of) these documents: what
    chunks are sized with. Counting every line's tokens would cap indexing at the tokenizer's
    speed (1-2.5 MB/s on 2 cores); the ratio, measured on the inputs themselves, keeps chunks
    within a few percent of their size in tokens."""
    if tokenizer is None:
        return float(BYTES_PER_TOKEN)
    sample = "".join(d.text for d in documents)[:_SAMPLE_CHARS]
    tokens = len(tokenizer.encode(sample))
    return max(len(sample.encode()) / tokens, 1.0) if tokens else float(BYTES_PER_TOKEN)


_SAMPLE_CHARS = 256 * 1024


class Chunker:
    """Cuts documents into chunks of at most `chunk_tokens` tokens, a token taken as
    `bytes_per_token` bytes (see `bytes_per_token`): whole paragraphs gathered while they fit; a
    paragraph larger than a chunk gathered by lines, a line by words, a word by characters."""

    def __init__(self, chunk_tokens: int, bytes_per_token: float) -> None:
        if chunk_tokens < 8:
            raise KimbhoError(f"--chunk-tokens must be at least 8, got {chunk_tokens}")
        self.chunk_tokens, self.bytes_per_token = chunk_tokens, bytes_per_token
        self.limit = max(int(chunk_tokens * bytes_per_token), 1)  # bytes per chunk

    def chunks(self, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) character offsets of the chunks of `text`, whitespace-only ones left out."""
        if text.isascii():
            size = _span_length
        else:
            size = lambda a, b: len(text[a:b].encode())  # noqa: E731
        return _gather(text, 0, len(text), 0, size, self.limit)


# Each level cuts a span of text into smaller spans, at paragraphs, lines, words, characters.
_LEVELS = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n"), re.compile(r"\s+"))


def _span_length(a: int, b: int) -> int:
    return b - a


def _pieces(text: str, a: int, b: int, level: int, limit: int) -> Iterator[tuple[int, int]]:
    """[a, b) cut after each separator of `level`; past the last, into runs of characters that
    fit `limit` bytes whatever they are (4 bytes a character at most)."""
    if level == len(_LEVELS):
        step = max(limit // 4, 1)
        yield from ((i, min(i + step, b)) for i in range(a, b, step))
        return
    at = a
    for m in _LEVELS[level].finditer(text, a, b):
        if m.end() > at:
            yield at, m.end()
            at = m.end()
    if at < b:
        yield at, b


def _gather(
    text: str, a: int, b: int, level: int, size: Callable[[int, int], int], limit: int
) -> Iterator[tuple[int, int]]:
    """Chunks of [a, b): its pieces at `level`, gathered while they fit `limit` bytes; a piece
    larger than that is gathered at the next level."""
    start = end = a
    for p, q in _pieces(text, a, b, level, limit):
        if size(p, q) > limit and level < len(_LEVELS):
            yield from _non_blank(text, start, end)
            yield from _gather(text, p, q, level + 1, size, limit)
            start = end = q
            continue
        if size(start, q) > limit:
            yield from _non_blank(text, start, end)
            start = p
        end = q
    yield from _non_blank(text, start, end)


def _non_blank(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    if text[start:end].strip():
        yield start, end


_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks(id INTEGER PRIMARY KEY, source TEXT NOT NULL, start INTEGER NOT NULL,
                    end INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE sources(source TEXT PRIMARY KEY, chunks INTEGER NOT NULL);
CREATE VIRTUAL TABLE terms USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');
"""


@dataclass(frozen=True)
class IndexInfo:
    chunk_tokens: int
    bytes_per_token: float
    tokenizer_sha256: str | None  # None: chunks sized by a fixed estimate of 4 bytes a token
    chunks: int
    sources: int


class Index:
    """An index directory, open for searching. The built-in retriever (`retrieval.Retriever`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file = self.path / INDEX_FILE
        if not self.path.is_dir():
            raise KimbhoError(f"index {self.path} does not exist; build one with `kimbho index build`")
        if not file.is_file():
            raise KimbhoError(
                f"{self.path} is not an index (no {INDEX_FILE}); build one with `kimbho index build`"
            )
        try:
            # Shared by the server's threads, one query at a time (`_lock`). Opened for writing
            # too: the first read rolls back what a killed `add` left in its journal.
            self.db = sqlite3.connect(file, check_same_thread=False)
            self._lock = threading.Lock()
            self._document_frequency: dict[str, int] = {}
            self._average: float | None = None
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            if int(meta["format"]) != FORMAT:
                raise KimbhoError(
                    f"index {self.path} has format {meta['format']}; this Kimbho reads {FORMAT}: rebuild it"
                )
            self.info = IndexInfo(
                int(meta["chunk_tokens"]),
                float(meta["bytes_per_token"]),
                meta.get("tokenizer_sha256") or None,
                self.db.execute("SELECT count(*) FROM chunks").fetchone()[0],
                self.db.execute("SELECT count(*) FROM sources").fetchone()[0],
            )
        except (sqlite3.DatabaseError, KeyError, ValueError) as e:
            raise KimbhoError(
                f"index {self.path} is corrupt or not a Kimbho index ({e}); rebuild it with `kimbho index build`"
            ) from None
        if self.info.chunks == 0:
            raise KimbhoError(f"index {self.path} is empty: add documents with `kimbho index add`")
        self.db.execute("CREATE VIRTUAL TABLE temp.vocabulary USING fts5vocab(main, 'terms', 'row')")

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """The `k` chunks that rank best for `query` by BM25, best first; none when no term of
        the query is in the index.

        FTS5 scores every chunk that holds any query term, so a common term (in a third of the
        chunks, say) costs milliseconds per ten thousand chunks. So when the query has rare
        terms (in under 5% of the chunks), FTS5 ranks the chunks by those, and the best
        `_CANDIDATES` get the common terms' share of BM25 added (same formula and statistics);
        a term in more than half of the chunks has no weight in BM25 (FTS5 clamps its IDF) and
        is left out. A query of common terms only is scored by FTS5 whole."""
        terms = query_terms(query)
        if not terms or k < 1:
            return []
        try:
            with self._lock:
                counts = {t: self._chunks_with(t) for t in terms}
                n = self.info.chunks
                present = [t for t in terms if counts[t]]
                if not present:
                    return []
                kept = [t for t in present if counts[t] * 2 <= n] or present
                rare = [t for t in kept if counts[t] <= n * _RARE]
                common = [t for t in kept if t not in rare]
                if not rare or not common:
                    return self._ranked(kept, k)
                found = self._ranked(rare, max(_CANDIDATES, k))
        except sqlite3.DatabaseError as e:
            raise KimbhoError(
                f"index {self.path} is corrupt ({e}); rebuild it with `kimbho index build`"
            ) from None
        average = self._average_length()
        rescored = []
        for passage in found:
            words = _TERM.findall(_fold(normalise(passage.text)))  # the chunk's terms, as FTS5 counts them
            extra = sum(_bm25(words.count(t), len(words), average, n, counts[t]) for t in common)
            rescored.append(dataclasses.replace(passage, score=passage.score + extra))
        return sorted(rescored, key=lambda p: -p.score)[:k]

    def _ranked(self, terms: list[str], k: int) -> list[Passage]:
        """FTS5's k best for any of `terms`."""
        # The k best first, then their chunks: joining before the LIMIT reads every match's row.
        rows = self.db.execute(
            "SELECT c.text, c.source, c.start, c.end, -best.score FROM (SELECT rowid, bm25(terms) AS score "
            "FROM terms WHERE terms MATCH ? ORDER BY score LIMIT ?) AS best "
            "JOIN chunks c ON c.id = best.rowid ORDER BY best.score",
            (_match(terms), k),
        ).fetchall()
        return [Passage(*row) for row in rows]

    def _average_length(self) -> float:
        """Terms per chunk on average, as BM25 normalises by (counted once per opening)."""
        if self._average is None:
            total = self.db.execute("SELECT sum(cnt) FROM temp.vocabulary").fetchone()[0] or 0
            self._average = total / max(self.info.chunks, 1)
        return self._average

    def _chunks_with(self, term: str) -> int:
        """How many chunks hold `term` (FTS5's own count, cached: it changes only by `add`)."""
        if term not in self._document_frequency:
            if len(self._document_frequency) > 100_000:
                self._document_frequency.clear()
            row = self.db.execute("SELECT doc FROM temp.vocabulary WHERE term = ?", (term,)).fetchone()
            self._document_frequency[term] = row[0] if row else 0
        return self._document_frequency[term]

    def close(self) -> None:
        self.db.close()


_RARE = 0.05  # a term in at most this share of the chunks picks the candidates
_CANDIDATES = 64  # chunks the common terms are scored on


def _fold(text: str) -> str:
    """Accents removed, as FTS5's `unicode61 remove_diacritics 2` removes them (recomposed
    after: Hangul syllables stay whole)."""
    if text.isascii():
        return text
    bare = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare)


def _bm25(tf: int, length: int, average: float, chunks: int, containing: int) -> float:
    """One term's share of a chunk's BM25, with FTS5's constants (k1 1.2, b 0.75) and IDF."""
    if not tf:
        return 0.0
    idf = max(math.log((chunks - containing + 0.5) / (containing + 0.5)), 1e-6)
    return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / average))


def _match(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of `terms`, each quoted: no user text is read as syntax."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _open_new(file: Path, chunker: Chunker, tokenizer: Tokenizer | None) -> sqlite3.Connection:
    db = sqlite3.connect(file)
    # The file is staged (renamed into place when whole), so it needs no journal while built.
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.executescript(_SCHEMA)
    meta = {
        "format": FORMAT,
        "chunk_tokens": chunker.chunk_tokens,
        "bytes_per_token": chunker.bytes_per_token,
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else "",
    }
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    return db


def _insert(db: sqlite3.Connection, documents: Iterable[Document], chunker: Chunker) -> dict[str, int]:
    """Chunk and index `documents`, skipping sources indexed before; what was added."""
    known = {s for (s,) in db.execute("SELECT source FROM sources")}
    next_id = (db.execute("SELECT max(id) FROM chunks").fetchone()[0] or 0) + 1
    counts: dict[str, int] = {}
    rows: list[tuple[int, str, int, int, str]] = []
    size = 0

    def flush() -> None:
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)", rows)
        db.executemany(
            "INSERT INTO terms(rowid, body) VALUES (?, ?)", [(r[0], normalise(r[4])) for r in rows]
        )
        rows.clear()

    for doc in documents:
        if doc.source in known:
            if doc.offset == 0:
                log.info(f"{doc.source} is indexed already: skipped")
            continue
        counts.setdefault(doc.source, 0)
        size += len(doc.text.encode())
        for start, end in chunker.chunks(doc.text):
            rows.append((next_id, doc.source, doc.offset + start, doc.offset + end, doc.text[start:end]))
            next_id += 1
            counts[doc.source] += 1
        if len(rows) >= _BATCH:
            flush()
    flush()
    db.executemany("INSERT INTO sources VALUES (?, ?)", counts.items())
    return {"documents": len(counts), "chunks": sum(counts.values()), "bytes": size}


def build_index(
    inputs: Sequence[str],
    out: str | Path,
    tokenizer: Tokenizer | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    text_field: str = "text",
    force: bool = False,
) -> dict[str, int]:
    """A new index of `inputs` at `out`, complete or not at all; chunks sized in `tokenizer`'s
    tokens (the model's, for retrieval-augmented generation), or 4 bytes a token without one."""
    from ..storage.staging import staged_directory

    documents = read_documents(inputs, text_field)
    head: list[Document] = []  # the documents the tokenizer is measured on
    for doc in documents:
        head.append(doc)
        if sum(len(d.text) for d in head) >= _SAMPLE_CHARS:
            break
    chunker = Chunker(chunk_tokens, bytes_per_token(tokenizer, head))
    with staged_directory(Path(out), force) as tmp:
        db = _open_new(tmp / INDEX_FILE, chunker, tokenizer)
        try:
            added = _insert(db, itertools.chain(head, documents), chunker)
            if added["chunks"] == 0:
                raise KimbhoError(f"the inputs hold no text to index ({', '.join(map(str, inputs))})")
            db.commit()
        finally:
            db.close()
    return added


def add_to_index(path: str | Path, inputs: Sequence[str], text_field: str = "text") -> dict[str, int]:
    """Index more documents, chunked as the index's first ones were (sources already there are
    skipped), in one transaction: all are added or, if the process dies, none."""
    info = Index(path).info
    db = sqlite3.connect(Path(path) / INDEX_FILE)
    try:
        added = _insert(
            db, read_documents(inputs, text_field), Chunker(info.chunk_tokens, info.bytes_per_token)
        )
        db.commit()
    finally:
        db.close()
    return added
