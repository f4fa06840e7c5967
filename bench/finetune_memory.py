"""Peak memory of fine-tuning the `base` preset, fully and with LoRA: `kimbho finetune` as a user
runs it, each in a fresh process whose peak RSS the kernel reports.

    python bench/finetune_memory.py [--steps 3] [--lora-rank 16] [--work DIR]

The base is the `base` preset (768 wide, 12 layers) with the built-in corpus's 2,048-token
vocabulary, its weights as `kimbho train` initialises them (1 step): memory does not depend on
what the weights are. Full fine-tuning keeps a gradient and two AdamW moments per weight; LoRA
keeps them for the adapters alone, so its peak is the frozen weights plus activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, cpu_name, save_results  # noqa: E402


def kimbho(*args: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kimbho", "-q", *map(str, args)], text=True, capture_output=True
    )
    if result.returncode:
        raise SystemExit(f"kimbho {' '.join(map(str, args))} failed:\n{result.stderr}")


def peak_rss_mb(*args: object) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, the log) of `kimbho ARGS` in a fresh child process."""
    child = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(r.stderr); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if r.returncode == 0 else -1)"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", child, sys.executable, "-m", "kimbho", *map(str, args)],
        text=True,
        capture_output=True,
    )
    peak = float(result.stdout.strip() or -1)
    if peak < 0:
        raise SystemExit(f"kimbho {' '.join(map(str, args))} failed:\n{result.stderr}")
    return peak, time.perf_counter() - start, result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each block's activations in the backward pass (default on): what a user "
        "short of memory sets, and what leaves the weights and optimizer state as the difference",
    )
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-ftmem-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base").is_dir():
        kimbho("prepare", "--out", work / "data", "--vocab-size", 2048, "--force")
        kimbho("train", "--data", work / "data", "--out", work / "base", "--preset", "base", "--max-steps", 1,
               "train.batch_size=1", "train.seq_len=64", "train.eval_every=0", "train.compile=false")  # fmt: skip
    chat = work / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(400):
            reply = " ".join(f"word{i * 7 + j}" for j in range(20 + i % 30))
            f.write(json.dumps({"prompt": f"List some words, number {i}.", "completion": reply}) + "\n")
    common = ["--data", chat, "--max-steps", args.steps, f"train.batch_size={args.batch_size}",
              f"train.seq_len={args.seq_len}", "train.eval_every=0", "train.compile=false",
              f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]  # fmt: skip
    results: dict[str, object] = {
        "cpu": cpu_name(),
        "steps": args.steps,
        "batch": [args.batch_size, args.seq_len],
    }
    for name, extra in (("full", []), ("lora", ["--lora-rank", args.lora_rank])):
        out = work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        peak, seconds, log = peak_rss_mb("finetune", work / "base", "--out", out, *common, *extra)
        described = next((line for line in log.splitlines() if "fine-tuning " in line and " on " in line), "")
        results[name] = {"peak_rss_mb": peak, "seconds": seconds, "log": described.removeprefix("kimbho: ")}
        print(
            f"{name:>4}: peak RSS {peak:,.0f} MiB in {seconds:.0f} s ({described.removeprefix('kimbho: ')})"
        )
    ratio = results["lora"]["peak_rss_mb"] / results["full"]["peak_rss_mb"]  # type: ignore[index]
    results["lora_over_full"] = ratio
    print(f"LoRA / full peak RSS: {ratio:.2f}x on {results['cpu']}")
    save_results(RESULTS / "finetune_memory.json", results)


if __name__ == "__main__":
    main()
