"""Named sources: which part of the data each document came from, and how much of each to train on.

`kimbho prepare --input web=crawl/ legal=contracts/` names its sources (a plain PATH is named after
its file or folder). The shards hold each source's documents as one contiguous run of each split,
and meta.json records the runs (`SourceSpan`), so training can sample the sources by a mixture
(`data.mix`, `data.mix_temperature`), and validation can report each source on its own.
"""

from __future__ import annotations

import glob
import logging
import math
import re
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import KimbhoError
from .corpus import (
    DEFAULT_CORPUS,
    CorpusReport,
    Section,
    default_corpus_sections,
    read_sections,
    resolve_inputs,
)

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")

_NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$")
# A source whose bytes per token fall below this share of the other sources' median is being cut
# into pieces by the tokenizer (a script it has few merges for): warned about.
POOR_FIT = 0.5
_FIT_BYTES = 4096
ENCODE_BATCH_CHARS = 4 * 1024 * 1024


def parse_inputs(specs: list[str]) -> dict[str, list[Path]]:
    """`["web=crawl/", "notes.txt"]` -> `{"web": [files...], "notes": [Path("notes.txt")]}`, in the
    order given. A spec names its source with `NAME=` unless it is itself an existing path; a plain
    PATH is named after its file (without suffix) or folder. Specs with the same name are one
    source; a file in two sources is an error."""
    sources: dict[str, list[Path]] = {}
    owner: dict[Path, str] = {}
    for spec in specs:
        match = _NAMED.match(spec)
        if match and not Path(spec).expanduser().exists():
            name, path = match.groups()
        else:
            name, path = default_name(spec), spec
        for file in resolve_inputs([path]):
            if owner.setdefault(file, name) != name:
                raise KimbhoError(f"{file} is in two sources, {owner[file]!r} and {name!r}; give it to one")
            if file not in sources.setdefault(name, []):
                sources[name].append(file)
    return sources


def default_name(path: str) -> str:
    """A plain PATH's source name: its file's stem or its folder's name (a glob's last folder
    before the wildcards)."""
    p = Path(path).expanduser()
    if glob.has_magic(path):
        p = Path(*p.parts[: next(i for i, part in enumerate(p.parts) if glob.has_magic(part))])
    p = p.resolve() if p.exists() else p  # "." is named after the folder it is
    name = p.stem if p.is_file() else p.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-") or "input"


class CorpusSource:
    """Where the text comes from: named input sources (`parse_inputs`), or the built-in default
    corpus when there are none. It can be read more than once (tokenizer training, then
    tokenization)."""

    def __init__(self, inputs: list[str] | None, text_field: str = "text") -> None:
        self.sources = parse_inputs(inputs) if inputs else None
        self.text_field = text_field

    def named_sections(self, report: CorpusReport | None = None) -> Iterator[tuple[str, Section]]:
        """(source name, section) of every document, source after source."""
        report = report if report is not None else CorpusReport()
        if self.sources is None:
            yield from ((DEFAULT_CORPUS, s) for s in default_corpus_sections(report))
            return
        for name, files in self.sources.items():
            yield from ((name, s) for s in read_sections(files, self.text_field, report))

    def texts(self) -> Iterator[str]:
        return (s.text for _, s in self.named_sections())

    def batches(
        self, report: CorpusReport | None = None, max_chars: int = ENCODE_BATCH_CHARS
    ) -> Iterator[list[tuple[str, Section]]]:
        """`named_sections` in lists of about `max_chars` characters: what a tokenizer's batch
        call encodes at once (in parallel, with bounded memory)."""
        batch: list[tuple[str, Section]] = []
        size = 0
        for item in self.named_sections(report):
            batch.append(item)
            size += len(item[1].text)
            if size >= max_chars:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def balanced_texts(self) -> Iterator[str]:
        """A tokenizer's training sample in which every source weighs as much as the largest:
        a smaller source's sections are each given `largest / its size` times (rounded
        systematically, so the total is right), so its words are counted as often and a minority
        language gets its share of the merges."""
        if self.sources is None or len(self.sources) == 1:
            yield from self.texts()
            return
        sizes = {name: sum(f.stat().st_size for f in files) for name, files in self.sources.items()}
        largest = max(sizes.values())
        seen: dict[str, int] = {}
        for name, section in self.named_sections():
            rate = largest / max(1, sizes[name])
            index = seen[name] = seen.get(name, -1) + 1
            for _ in range(math.floor((index + 1) * rate + 0.5) - math.floor(index * rate + 0.5)):
                yield section.text

    @property
    def total_bytes(self) -> int | None:
        if self.sources is None:
            return None
        return sum(f.stat().st_size for files in self.sources.values() for f in files)

    def inputs(self) -> dict[str, list[str]]:
        """Each source's files (none for the built-in corpus), for meta.json."""
        if self.sources is None:
            return {DEFAULT_CORPUS: []}
        return {name: [str(f) for f in files] for name, files in self.sources.items()}


@dataclass(frozen=True)
class SourceSpan:
    """A source's run of tokens in one split: ids [start, start + tokens), standing for `bytes`
    bytes of text in `documents` documents."""

    start: int
    tokens: int
    bytes: int
    documents: int


def source_spans(meta: Mapping[str, Any], split: str) -> dict[str, SourceSpan] | None:
    """Each source's span of `split`, in order; None for data prepared before sources were named
    (meta.json's `sources` was a list of files)."""
    sources = meta.get("sources")
    if not isinstance(sources, dict):
        return None
    return {name: SourceSpan(**info[split]) for name, info in sources.items()}


def parse_mix(spec: str) -> dict[str, float]:
    """`"web:0.7,legal:0.3"` -> `{"web": 0.7, "legal": 0.3}`; weights are relative (need not sum to 1)."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, raw = item.rpartition(":")
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        if (
            not sep
            or not name.strip()
            or not (weight >= 0 and math.isfinite(weight))
            or name.strip() in weights
        ):
            raise KimbhoError(
                f"data.mix={spec!r}: {item!r} is not NAME:WEIGHT with a non-negative weight, once per "
                f"source (for example data.mix=web:0.7,legal:0.3)"
            )
        weights[name.strip()] = weight
    if weights and sum(weights.values()) == 0:
        raise KimbhoError(f"data.mix={spec!r} gives every source weight 0; give one a positive weight")
    return weights


def mixture(
    spans: Mapping[str, SourceSpan], weights: Mapping[str, float], temperature: float, seq_len: int
) -> dict[str, float]:
    """The probability that a training row is drawn from each source: `weights` (default: each
    source's share of the tokens) raised to `temperature` (< 1 flattens toward uniform) and
    normalised. Every source of the data needs a weight, and one with weight above 0 needs a
    sequence's worth of tokens."""
    if weights:
        unknown = [name for name in weights if name not in spans]
        missing = [name for name in spans if name not in weights]
        if unknown:
            raise KimbhoError(
                f"data.mix names {', '.join(map(repr, unknown))}, which the data does not have; its "
                f"sources are {', '.join(spans)}"
            )
        if missing:
            raise KimbhoError(
                f"data.mix gives no weight to {', '.join(map(repr, missing))}; give every source of the "
                f"data a weight (0 leaves one out)"
            )
    base = dict(weights) if weights else {name: float(span.tokens) for name, span in spans.items()}
    for name, weight in base.items():
        if weight > 0 and spans[name].tokens < seq_len + 1:
            raise KimbhoError(
                f"source {name!r} has {spans[name].tokens} training tokens, fewer than one sequence of "
                f"{seq_len + 1}; give it weight 0 in data.mix or add text to it"
            )
    tempered = {name: weight**temperature if weight > 0 else 0.0 for name, weight in base.items()}
    total = sum(tempered.values())
    return {name: value / total for name, value in tempered.items()}


def shares(sizes: Mapping[str, int], total: int | None) -> dict[str, int]:
    """Split a budget of `total` (all when None) over sources as evenly as their `sizes` allow:
    a source smaller than its even share gives the rest to the others."""
    if total is None:
        return dict(sizes)
    out: dict[str, int] = {}
    left = total
    ordered = sorted(sizes, key=lambda name: sizes[name])
    for n, name in enumerate(ordered):
        out[name] = min(sizes[name], left // (len(ordered) - n))
        left -= out[name]
    return {name: out[name] for name in sizes}


def tokenizer_report(tokenizer: Tokenizer, source: CorpusSource) -> list[dict[str, Any]]:
    """How well `tokenizer` fits each source: UTF-8 bytes per token (higher: longer merges) and
    tokens per whitespace-separated word (higher: words cut into more pieces), over all its text."""
    counts = {name: [0, 0, 0] for name in source.inputs()}  # name -> [bytes, tokens, words]
    for batch in source.batches():
        for (name, section), ids in zip(
            batch, tokenizer.encode_batch([s.text for _, s in batch]), strict=True
        ):
            c = counts[name]
            c[0] += len(section.text.encode())
            c[1] += len(ids)
            c[2] += len(section.text.split())
    return [
        {
            "source": name,
            "bytes_per_token": b / t if t else 0.0,
            "tokens_per_word": t / w if w else 0.0,
            "bytes": b,
            "tokens": t,
        }
        for name, (b, t, w) in counts.items()
    ]


def poor_fits(counts: Mapping[str, tuple[int, int]]) -> list[str]:
    """A warning for each source that the tokenizer cuts into much smaller pieces than the others:
    from each source's (bytes, tokens), its bytes per token below `POOR_FIT` of the other
    sources' median. Sources of under `_FIT_BYTES` bytes are too small to judge."""
    fit = {name: b / t for name, (b, t) in counts.items() if t and b >= _FIT_BYTES}
    warnings = []
    for name, value in fit.items():
        others = [v for n, v in fit.items() if n != name]
        if others and value < POOR_FIT * statistics.median(others):
            warnings.append(
                f"the tokenizer fits source {name!r} poorly: {value:.2f} bytes per token against "
                f"{statistics.median(others):.2f} for the others; train a tokenizer that includes it "
                f"(`kimbho tokenizer train --input {name}=PATH ...`) or expect it to cost more tokens"
            )
    return warnings
