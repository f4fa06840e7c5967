"""Named sources, mixtures and continued pretraining, measured through the CLI on held-out text.

    python bench/mixtures.py [--data tinyshakespeare.txt] [--steps 300]   # ~20 min on 2 cores

1. Tokenizers: a corpus of English (the first 10/11 of the text) and a minority "language" (the
   last 1/11, every letter substituted by a fixed permutation: English's statistics, no English
   words), 10:1. `kimbho tokenizer train` balanced (the default) and `--no-balance`; `kimbho
   tokenizer report` gives each source's bytes per token.
2. Mixture temperature at equal compute: the same model and steps on the two sources prepared
   with the balanced tokenizer, sampled in proportion (data.mix_temperature=1) and flattened
   (0.7, 0.5); validation bits per byte of each source (`by_source`). The minority holds only
   ~33k tokens of tinyshakespeare, so the runs are short: at 1,000 steps a flattened mixture
   repeats it ~14 times and overfits it (measured: bpb 2.75 at 0.5 against 2.51 in proportion).
3. Continued pretraining: a base trained on the English alone (data.mix=en:1,domain:0), then
   `kimbho train --init BASE` on a domain corpus (CPython's documentation, which the base never
   saw), without replay and with a share of the English replayed through the mixture.
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_CORPUS, RESULTS, cpu_name, save_results
from finetune_behaviour import kimbho

CIPHER = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase,
    "qwertyuiopasdfghjklzxcvbnm" + "qwertyuiopasdfghjklzxcvbnm".upper(),
)
MODEL = [
    "model.emb_dim=192", "model.num_heads=6", "model.group_size=3", "model.num_blocks=4",
    "model.max_seq_len=128", "model.tie_embeddings=true", "train.batch_size=16", "train.save_every=0",
    "train.compile=false", "train.eval_every=0", "train.eval_tokens=1000000",
]  # fmt: skip


def documents(text: str, size: int = 2000) -> list[str]:
    """`text` cut at blank lines into documents of about `size` characters."""
    out, pending = [], ""
    for paragraph in text.split("\n\n"):
        pending += paragraph + "\n\n"
        if len(pending) >= size:
            out.append(pending)
            pending = ""
    return out + ([pending] if pending.strip() else [])


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def by_source(run: Path) -> dict[str, float]:
    """Each source's validation bits per byte at the run's last evaluation."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    return {name: round(v["val_bpb"], 4) for name, v in last["by_source"].items()}


def curve(run: Path) -> list[list[object]]:
    """[step, {source: val_bpb}] of every evaluation of the run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        [r["step"], {n: round(v["val_bpb"], 4) for n, v in r["by_source"].items()}]
        for r in records
        if r["kind"] == "eval"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help="the English text")
    parser.add_argument(
        "--steps", type=int, default=300, help="steps of each run: mixtures, the base, each continuation"
    )
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"cpu": cpu_name(), "steps": args.steps}
    start = time.perf_counter()

    # 1. Tokenizers, balanced and not.
    docs = documents(args.data.read_text())
    cut = len(docs) * 10 // 11
    en = write_jsonl(work / "en.jsonl", docs[:cut])
    xx = write_jsonl(work / "xx.jsonl", [d.translate(CIPHER) for d in docs[cut:]])
    inputs = [f"en={en}", f"xx={xx}"]
    report = {}
    for name, flag in (("balanced", []), ("proportional", ["--no-balance"])):
        out = work / f"tokenizer-{name}.json"
        kimbho(
            "tokenizer",
            "train",
            "--input",
            *inputs,
            "--vocab-size",
            args.vocab,
            "--out",
            out,
            "--force",
            *flag,
        )
        lines = kimbho("tokenizer", "report", "--tokenizer", out, "--input", *inputs).stdout.splitlines()
        report[name] = {r["source"]: round(r["bytes_per_token"], 3) for r in map(json.loads, lines)}
    results["bytes_per_token"] = report

    # 2. Mixture temperature at equal compute.
    data = work / "bilingual"
    kimbho(
        "prepare",
        "--input",
        *inputs,
        "--tokenizer",
        work / "tokenizer-balanced.json",
        "--out",
        data,
        "--force",
    )
    meta = json.loads((data / "meta.json").read_text())
    results["train_tokens"] = {n: s["train"]["tokens"] for n, s in meta["sources"].items()}
    temperature = {}
    for t in (1.0, 0.7, 0.5):
        run = work / f"mix-t{t}"
        kimbho(
            "train", "--data", data, "--out", run, "--max-steps", args.steps, *MODEL,
            f"data.mix_temperature={t}", f"train.eval_every={max(1, args.steps // 3)}",
        )  # fmt: skip
        temperature[str(t)] = by_source(run)
        temperature[str(t)]["curve"] = curve(run)
    results["val_bpb_by_temperature"] = temperature

    # 3. Continued pretraining on a domain corpus, with and without replay.
    from pydoc_data.topics import topics

    domain = write_jsonl(
        work / "domain.jsonl", [t for name in sorted(topics) for t in documents(topics[name])]
    )
    mixed = work / "continued"
    kimbho(
        "prepare", "--input", f"en={en}", f"domain={domain}", "--tokenizer", work / "tokenizer-balanced.json",
        "--out", mixed, "--force",
    )  # fmt: skip
    base = work / "base"
    kimbho(
        "train", "--data", mixed, "--out", base, "--max-steps", args.steps, *MODEL, "data.mix=en:1,domain:0"
    )
    continued = {"base": by_source(base)}
    model_args = [a for a in MODEL if not a.startswith("model.")]
    for name, mix in (("no replay", "en:0,domain:1"), ("replay 25%", "en:0.25,domain:0.75")):
        run = work / f"continued-{name.replace(' ', '-').replace('%', '')}"
        kimbho(
            "train", "--init", base, "--data", mixed, "--out", run, "--max-steps", args.steps,
            *model_args, f"data.mix={mix}", "train.lr=1e-3", "train.warmup_steps=10",
        )  # fmt: skip
        continued[name] = by_source(run)
    results["continued_pretraining"] = continued
    results["total_sec"] = round(time.perf_counter() - start)

    b, p = report["balanced"], report["proportional"]
    print(
        f"bytes per token of the minority: balanced tokenizer {b['xx']:.2f}, proportional {p['xx']:.2f} "
        f"(English {b['en']:.2f} / {p['en']:.2f})"
    )
    shares = results["train_tokens"]
    for t, bpb in temperature.items():
        p = {n: v ** float(t) for n, v in shares.items()}  # type: ignore[attr-defined]
        print(
            f"data.mix_temperature={t} (xx {p['xx'] / sum(p.values()):.1%} of rows): "
            f"val bpb en {bpb['en']:.4f}, xx {bpb['xx']:.4f}"
        )
    for name, bpb in continued.items():
        print(f"{name:>11}: val bpb en {bpb['en']:.4f}, domain {bpb['domain']:.4f}")
    print(f"on {results['cpu']}, {results['total_sec']} s")
    save_results(RESULTS / "mixtures.json", results)


if __name__ == "__main__":
    main()
