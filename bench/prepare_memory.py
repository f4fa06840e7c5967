"""Peak memory of `kimbho prepare` as the corpus grows: it streams, so memory stays bounded by
the shard buffer and one batch of text, not by the corpus size.

    python bench/prepare_memory.py --sizes-gb 0.25 2 [--workdir /tmp/kimbho-bench]

Each size is a generated text file (the built-in corpus repeated with numbered variations),
tokenized by a fresh process whose peak RSS is read from the kernel. Prints a table; the
corpus of the largest size is several times the shard buffer (256 MiB of uint16 tokens).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, threading, time
import kimbho
from kimbho.data.prepare import DEFAULT_SHARD_TOKENS
samples = []  # resident memory every second, to see whether it keeps growing
def sample():
    while True:
        rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
        samples.append(rss)
        time.sleep(1)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
meta = kimbho.prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], force=True)
seconds = time.perf_counter() - start
tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
half = len(samples) // 2
print(json.dumps({"seconds": seconds, "tokens": tokens, "shards": len(meta["splits"]["train"]["shards"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "first_half_mb": max(samples[:half]), "second_half_mb": max(samples[half:]),
                  "shard_buffer_mb": DEFAULT_SHARD_TOKENS * 2 / 2**20}))
"""


def make_corpus(path: Path, size_bytes: int) -> None:
    from pydoc_data.topics import topics

    base = "\n\n".join(topics.values())
    written, copy = 0, 0
    with path.open("w") as f:
        while written < size_bytes:
            piece = f"Copy {copy} of the Python reference.\n\n{base}\n"
            f.write(piece)
            written += len(piece.encode())
            copy += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 2.0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kimbho-bench-prepare"))
    args = parser.parse_args()

    import kimbho

    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.workdir / "tokenizer.json"
    from pydoc_data.topics import topics

    kimbho.Tokenizer.train(list(topics.values()), 8192).save(tokenizer_path)
    rows = []
    for gb in args.sizes_gb:
        corpus = args.workdir / f"corpus-{gb}gb.txt"
        if not corpus.exists() or corpus.stat().st_size < gb * 2**30:
            make_corpus(corpus, int(gb * 2**30))
        out = args.workdir / f"data-{gb}gb"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(corpus), str(out), str(tokenizer_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        stats["corpus_gb"] = corpus.stat().st_size / 2**30
        stats["wall"] = time.perf_counter() - started
        rows.append(stats)
        shutil.rmtree(out, ignore_errors=True)
    print("| corpus | tokens | shards | shard buffer | peak RSS | max RSS 1st / 2nd half of the run | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mbps = r["corpus_gb"] * 1024 / r["seconds"]
        print(
            f"| {r['corpus_gb']:.2f} GiB | {r['tokens'] / 1e6:.0f}M | {r['shards']} | {r['shard_buffer_mb']:.0f} MiB "
            f"| {r['peak_rss_mb']:.0f} MiB | {r['first_half_mb']:.0f} / {r['second_half_mb']:.0f} MiB | {mbps:.1f} |"
        )


if __name__ == "__main__":
    main()
