"""What the inference dtypes cost in quality, on a trained MODEL: validation bits per byte of each
`--dtype` (as `kimbho eval` computes it) against fp32, and how many of 64 greedy tokens each
dtype's default decode path picks as fp32 eager does, on 20 prompts cut from the validation text.

    python bench/inference_dtypes.py runs/demo --data runs/demo-data [--prompts 20] [--new-tokens 64]

`--data` is a prepared DATA_DIR or a text file, as for `kimbho eval`. The prompts are the first 16
tokens of 20 evenly spaced stretches of the data's validation text (a text file: the whole file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import RESULTS, cpu_name

import kimbho
from kimbho.evaluation import evaluate


def validation_ids(data: Path, tokenizer: kimbho.Tokenizer) -> list[int]:
    """The ids prompts are cut from: a prepared directory's validation split, or the file's text."""
    if data.is_file():
        return tokenizer.encode(data.read_text())
    from kimbho.data.shards import TokenStream

    stream = TokenStream(data, "val")
    return [int(i) for i in stream.window(0, len(stream))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    reference, tokenizer = kimbho.load(args.model, dtype="fp32")
    ids = validation_ids(args.data, tokenizer)
    stride = max((len(ids) - args.prompt_tokens) // args.prompts, 1)
    prompts = [ids[i * stride : i * stride + args.prompt_tokens] for i in range(args.prompts)]
    expected = kimbho.generate_batch(reference, prompts, args.new_tokens, compile=False)
    print(f"{args.model} on {cpu_name()}, torch {torch.__version__}")
    print("| dtype | val bpb | vs fp32 | greedy tokens as fp32 eager picks | prompts fully equal |")
    print("|---|---|---|---|---|")
    results = {}
    for dtype in ("fp32", "bf16", "int8"):
        model, _ = kimbho.load(args.model, dtype=dtype)
        bpb = evaluate(model, tokenizer, args.data)["bits_per_byte"]
        # One prompt at a time, as `kimbho generate` does: one compiled package per dtype.
        rows = [kimbho.generate_batch(model, [p], args.new_tokens, compile=True)[0] for p in prompts]
        same = [
            sum(a == b for a, b in zip(got[len(p) :], want[len(p) :], strict=True))
            for p, got, want in zip(prompts, rows, expected, strict=True)
        ]
        base = results.get("fp32", {}).get("bits_per_byte", bpb)
        results[dtype] = {
            "bits_per_byte": bpb,
            "greedy_same": sum(same),
            "prompts_equal": same.count(args.new_tokens),
        }
        print(
            f"| {dtype} | {bpb:.4f} | {100 * (bpb / base - 1):+.2f}% | {sum(same)}/{len(same) * args.new_tokens} | "
            f"{same.count(args.new_tokens)}/{len(same)} |",
            flush=True,
        )
    out = RESULTS / "inference_dtypes.json"
    out.write_text(json.dumps({"model": args.model, "cpu": cpu_name(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
