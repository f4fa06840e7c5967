"""Index build throughput and search latency: `kimbho index build` on a generated corpus larger
than SQLite's page cache, run as a user runs it (a child process: its wall time and peak memory),
then BM25 searches of question-like queries against the index it made.

    python bench/retrieval_speed.py [--megabytes 100] [--tokenizer MODEL]

Peak memory is the build process's own high-water mark (VmHWM, so Linux only). The corpus:
files of paragraphs of words drawn from a Zipf distribution over a 50,000-word
generated vocabulary (as text is: a few words everywhere, most words rare). Queries: 6 words
each, 2 common and 4 from the rare tail, as a question names its subject.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, cpu_name, save_results  # noqa: E402

from kimbho.retrieval.index import Index  # noqa: E402


def vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 11, size)
    return list(dict.fromkeys("".join(rng.choice(letters, n)) for n in lengths))


def write_corpus(folder: Path, megabytes: float, words: list[str], rng: np.random.Generator) -> int:
    """Files of ~1 MB, paragraphs of 40-120 words on lines of ~12; the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    ranks = np.minimum(rng.zipf(1.2, size=int(megabytes * 200_000)), len(words)) - 1
    vocab = np.array(words)
    written, at, n = 0, 0, 0
    while written < megabytes * 1e6 and at < len(ranks):
        paragraphs = []
        size = 0
        while size < 1_000_000 and at < len(ranks):
            count = int(rng.integers(40, 120))
            chosen = vocab[ranks[at : at + count]]
            at += count
            lines = [" ".join(chosen[i : i + 12]) for i in range(0, len(chosen), 12)]
            paragraphs.append("\n".join(lines))
            size += sum(len(line) + 1 for line in lines) + 1
        text = "\n\n".join(paragraphs) + "\n"
        (folder / f"doc-{n:05d}.txt").write_text(text)
        written += len(text.encode())
        n += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument(
        "--tokenizer", default=None, help="size chunks in this tokenizer's tokens (a MODEL or tokenizer.json)"
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-retrieval-"))
    rng = np.random.default_rng(0)
    words = vocabulary(rng, 50_000)
    size = write_corpus(work / "corpus", args.megabytes, words, rng)

    # The build's own peak memory (VmHWM, which starts afresh at exec: RUSAGE_CHILDREN would
    # count this process's memory too, copied at fork).
    report_peak = (
        "import sys; from kimbho.cli import main; code = main(sys.argv[1:]); "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr); sys.exit(code)"
    )
    command = [sys.executable, "-c", report_peak, "-q", "index", "build", "--input", str(work / "corpus")]
    command += ["--out", str(work / "index"), "--force"]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    build_sec = time.perf_counter() - start
    peak_mb = int(done.stderr.split("VmHWM:")[1].split()[0]) / 1024
    index_mb = (work / "index" / "index.sqlite").stat().st_size / 1e6

    index = Index(work / "index")
    queries = [
        " ".join([*rng.choice(words[:50], 2), *rng.choice(words[1000:], 4)]) for _ in range(args.queries)
    ]
    index.search(queries[0], 4)  # the first search reads the index's pages in
    latencies = []
    hits = 0
    for query in queries:
        start = time.perf_counter()
        found = index.search(query, 4)
        latencies.append(time.perf_counter() - start)
        hits += bool(found)
    latencies.sort()
    results = {
        "cpu": cpu_name(),
        "corpus_mb": size / 1e6,
        "chunks": index.info.chunks,
        "build_sec": build_sec,
        "build_mb_per_sec": size / 1e6 / build_sec,
        "build_peak_rss_mb": peak_mb,
        "index_mb": index_mb,
        "search_p50_ms": 1000 * statistics.median(latencies),
        "search_p95_ms": 1000 * latencies[int(0.95 * len(latencies))],
        "queries_with_hits": hits / len(queries),
    }
    print(
        f"{results['corpus_mb']:.0f} MB -> {results['chunks']:,} chunks in {build_sec:.1f} s: "
        f"{results['build_mb_per_sec']:.1f} MB/s, peak RSS {peak_mb:.0f} MB, index {index_mb:.0f} MB; "
        f"search p50 {results['search_p50_ms']:.2f} ms, p95 {results['search_p95_ms']:.2f} ms (k=4) on {results['cpu']}"
    )
    save_results(RESULTS / "retrieval_speed.json", results)


if __name__ == "__main__":
    main()
