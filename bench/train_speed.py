"""Training throughput: Kimbho's trainer against Hugging Face `LlamaForCausalLM` + AdamW.

The `small` preset, batch 16 x 256, the same batches (tinyshakespeare), each configuration in
its own process so peak memory is its own. Kimbho runs its trainer as a user gets it
(`train_step`: fused output-projection-and-loss, the default optimizer, `compile=auto`), plus
variants that show where the speed comes from. Hugging Face runs `LlamaForCausalLM` (SDPA
attention) with the HF Trainer's default optimizer (`torch.optim.AdamW`, fused) and gradient
clipping, with `torch.autocast` for bf16, and (`hf-strong`) the strong recipe's optimizer (`_common`:
weight decay on matrices, betas (0.9, 0.95)). The first step (compilation, allocation) is reported
apart; tokens/s are over the timed steps after it. MFU is the model's training FLOPs (6N plus
attention, PaLM appendix B; the same count for both) at that speed over the matrix-product peak
this machine measures in the same precision.

Each precision is a separate invocation, so each fits a ~10-minute CPU lock (bf16 steps take
minutes where bf16 is emulated, so run them one implementation at a time with few steps):

    flock /tmp/kimbho-cpu.lock python bench/train_speed.py --precision fp32
    flock /tmp/kimbho-cpu.lock python bench/train_speed.py --precision bf16 --which kimbho --steps 1
    flock /tmp/kimbho-cpu.lock python bench/train_speed.py --precision bf16 --which hf --steps 1
    python bench/train_speed.py --report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    BATCH,
    DEFAULT_CORPUS,
    RESULTS,
    SEQ_LEN,
    cpu_name,
    hf_model,
    hf_train_step,
    load_results,
    model_config,
    peak_rss_mb,
    prepared_data,
    save_results,
    strong_hf_optimizer,
)

from kimbho.config import RunConfig, TrainConfig
from kimbho.data.shards import RandomWindowSampler, TokenStream
from kimbho.device import peak_flops
from kimbho.model import KimbhoV1Model
from kimbho.training.trainer import Trainer

RESULTS_FILE = RESULTS / "train_speed.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kimbho_variants() -> dict[str, dict[str, Any]]:
    """Kimbho configurations: the defaults, then each default switched off or swapped."""
    other = "adamw" if TrainConfig().optimizer == "muon" else "muon"
    return {"kimbho": {}, "kimbho-eager": {"compile": "false"}, f"kimbho-{other}": {"optimizer": other}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--which", default=None, help="comma-separated runs (default: all Kimbho variants, hf, hf-strong)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default fp32 5, bf16 1)")
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help="text corpus (tinyshakespeare)")
    parser.add_argument("--report", action="store_true", help="print the table of saved results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        report(load_results(RESULTS_FILE))
        return
    steps = args.steps or (5 if args.precision == "fp32" else 1)
    data_dir = prepared_data(args.data)
    if args.worker:
        row = run_worker(args.worker, args.precision, steps, data_dir)
        print("RESULT " + json.dumps(row))
        return
    names = args.which.split(",") if args.which else [*kimbho_variants(), "hf", "hf-strong"]
    results = load_results(RESULTS_FILE)
    peak = peak_flops(torch.device("cpu"), DTYPES[args.precision])
    for name in names:
        print(f"{name} ({args.precision}, {steps} timed steps)...", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--precision",
            args.precision,
            "--steps",
            str(steps),
        ]
        proc = subprocess.run([*cmd, "--data", str(args.data)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT ") :])
        row.update(precision=args.precision, peak_tflops=peak / 1e12, mfu=row["flops_per_sec"] / peak)
        row["machine"] = f"{cpu_name()}, {torch.get_num_threads()} threads"
        results[f"{name}/{args.precision}"] = row
        print(
            f"  {row['tokens_per_sec']:.0f} tok/s, MFU {row['mfu']:.1%}, peak RSS {row['peak_rss_mb']:.0f} MB"
        )
        save_results(RESULTS_FILE, results)
    report(results)


def run_worker(name: str, precision: str, steps: int, data_dir: Path) -> dict[str, Any]:
    # Both sides import transformers, so the libraries' share of resident memory is the same.
    import transformers  # noqa: F401

    cfg = model_config()
    flops_per_token = KimbhoV1Model(cfg).flops_per_token(SEQ_LEN)
    if name in ("hf", "hf-strong"):
        step, setup = hf_stepper(cfg, precision, data_dir, strong=name == "hf-strong")
    else:
        overrides = kimbho_variants()[name]
        step, setup = kimbho_stepper(cfg, precision, data_dir, overrides)
    start = time.perf_counter()
    step(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    seconds = time.perf_counter() - start
    tokens_per_sec = steps * BATCH * SEQ_LEN / seconds
    return {
        "first_step_sec": first,
        "sec_per_step": seconds / steps,
        "tokens_per_sec": tokens_per_sec,
        "flops_per_sec": tokens_per_sec * flops_per_token,
        "peak_rss_mb": peak_rss_mb(),
        "setup": setup,
    }


def kimbho_stepper(cfg: Any, precision: str, data_dir: Path, overrides: dict[str, Any]) -> tuple[Any, str]:
    train = TrainConfig(
        batch_size=BATCH, seq_len=SEQ_LEN, precision=precision, save_every=0, eval_every=0, **overrides
    )
    out = tempfile.mkdtemp(prefix="kimbho-speed-")
    trainer = Trainer(RunConfig(cfg, train), data_dir, Path(out), progress_bar=False)
    setup = f"optimizer {train.optimizer}, {'compiled' if trainer.compiled else 'eager'}"
    return trainer.train_step, setup


def hf_stepper(cfg: Any, precision: str, data_dir: Path, strong: bool = False) -> tuple[Any, str]:
    """HF's default AdamW, or (`strong`) the strong recipe's (weight decay on matrices, betas
    (0.9, 0.95)): the same kernel, so the speeds differ by the decay groups only."""
    torch.manual_seed(0)
    model = hf_model(cfg)
    model.train()
    optimizer = (
        strong_hf_optimizer(model) if strong else torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    )
    sampler = RandomWindowSampler(TokenStream(data_dir, "train"), SEQ_LEN, BATCH, seed=0)

    def step(i: int) -> None:
        batch = sampler.batch(i)
        hf_train_step(model, optimizer, batch.inputs, batch.targets, dtype=DTYPES[precision])

    recipe = "strong recipe's AdamW (fused, decay groups)" if strong else "AdamW (fused)"
    return step, f"{recipe}, attention {model.config._attn_implementation}"


def report(results: dict[str, Any]) -> None:
    if not results:
        raise SystemExit(f"no results in {RESULTS_FILE}; run a precision first")
    print(f"\n`small` preset, batch {BATCH} x {SEQ_LEN}, {next(iter(results.values()))['machine']}")
    print(
        "| run | precision | setup | first step (s) | tokens/s | MFU | peak RSS (MB) | tokens/s vs HF | RSS vs HF |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, row in results.items():
        name, precision = key.split("/")
        hf = results.get(f"hf/{precision}")
        speed = f"{row['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x" if hf else "-"
        memory = f"{row['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x" if hf else "-"
        print(
            f"| {name} | {precision} | {row['setup']} | {row['first_step_sec']:.1f} | {row['tokens_per_sec']:.0f} "
            f"| {row['mfu']:.1%} of {row['peak_tflops']:.3f} TFLOP/s | {row['peak_rss_mb']:.0f} | {speed} | {memory} |"
        )
    # The target compares Kimbho as shipped (the `kimbho` rows) with HF's fastest mode.
    ours = [(k, r) for k, r in results.items() if k.split("/")[0] == "kimbho"]
    theirs = [(k, r) for k, r in results.items() if k.split("/")[0] in ("hf", "hf-strong")]
    if ours and theirs:
        (k_key, k), (h_key, h) = (
            max(rows, key=lambda kr: kr[1]["tokens_per_sec"]) for rows in (ours, theirs)
        )
        print(
            f"\nbest modes: Kimbho {k_key} {k['tokens_per_sec']:.0f} tok/s vs Hugging Face {h_key} "
            f"{h['tokens_per_sec']:.0f} tok/s: {k['tokens_per_sec'] / h['tokens_per_sec']:.2f}x"
        )


if __name__ == "__main__":
    main()
