"""The prepared GPU check: one script, on one CUDA GPU, in about 8 minutes with compilation.

    python bench/gpu_check.py                      # on a machine with a CUDA GPU
    python bench/gpu_check.py --device cpu --preset tiny --steps 6 --batch 4 --seq-len 32 \\
        --decode-tokens 8 --compile false          # the same checks on a CPU, small (tests)

1. Trains `--preset` (default `base`) for `--steps` steps on the built-in corpus in bf16 (the
   device's `precision=auto`), compiled: tokens/s and MFU against the device's measured bf16
   matrix peak (`device.peak_flops`), from the run's own metrics.jsonl.
2. Save and resume: the run saved a checkpoint half-way; a copy resumed from it trains the second
   half again, and its per-step losses must equal the first run's (to `--resume-tolerance`:
   GPU kernels that add with atomics are not bit-deterministic).
3. Decodes 128 greedy tokens at batch 1 and 32 with the compiled (CUDA-graph) decode step.
4. The trained model's logits on the GPU against the CPU's, fp32 both (and bf16 on the GPU).

Prints one line per check and writes bench/results/gpu_check.json; exits 1 if a check fails,
2 at once (one line) if the device is not there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from _common import RESULTS, save_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", default="true", choices=("true", "false"))
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument(
        "--resume-tolerance", type=float, default=2e-2, help="largest per-step loss difference"
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            f"run it on a machine with one, or pass --device cpu for a dry run",
            file=sys.stderr,
        )
        return 2
    if args.steps < 4 or args.steps % 2:
        parser.error("--steps must be even and at least 4 (the run saves half-way)")

    import kimbho
    from kimbho.config import KimbhoConfig, RunConfig, TrainConfig
    from kimbho.device import pick_precision
    from kimbho.training.metrics import read_metrics

    work = args.work or Path(tempfile.mkdtemp(prefix="kimbho-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, object] = {"device": name, "torch": torch.__version__, "preset": args.preset}
    failures: list[str] = []
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    # 1. Training in bf16, compiled.
    data = work / "data"
    if not (data / "meta.json").is_file():
        kimbho.prepare(None, data, vocab_size=KimbhoConfig.from_preset(args.preset).vocab_size, force=True)
    half = args.steps // 2
    train = TrainConfig(
        batch_size=args.batch, seq_len=args.seq_len, max_steps=args.steps, warmup_steps=min(25, half),
        log_every=1, eval_every=args.steps, eval_tokens=args.batch * args.seq_len, save_every=half,
        sample_tokens=8, keep_last=2, device=args.device, compile=args.compile, seed=0,
    )  # fmt: skip
    run = RunConfig(KimbhoConfig.from_preset(args.preset), train)
    run.model.max_seq_len = max(run.model.max_seq_len, args.seq_len)
    first = work / "run"
    shutil.rmtree(first, ignore_errors=True)
    trainer = kimbho.Trainer(run, data, first, progress_bar=False)
    dtype = trainer.dtype
    trainer.fit()
    records = read_metrics(first, "train")
    steady = records[len(records) // 2 :]  # past compilation and warm-up
    tokens_per_sec = sorted(r["tokens_per_sec"] for r in steady)[len(steady) // 2]
    mfu = sorted(r["mfu"] for r in steady)[len(steady) // 2]
    results["train"] = {
        "precision": str(dtype).removeprefix("torch."),
        "compiled": trainer.compiled,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch": [args.batch, args.seq_len],
        "tokens_per_sec_median": round(tokens_per_sec),
        "mfu_median": round(mfu, 4),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
    }
    say(
        f"train {args.preset} {args.steps} steps, {str(dtype).removeprefix('torch.')}, compiled {trainer.compiled}: "
        f"{tokens_per_sec:,.0f} tokens/s, MFU {mfu:.1%} of the measured peak; loss "
        f"{records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}"
    )
    if not records[-1]["loss"] < records[0]["loss"]:
        failures.append("training loss did not fall")

    # 2. Save and resume: a copy without its final checkpoint resumes from the half-way one.
    second = work / "resumed"
    shutil.rmtree(second, ignore_errors=True)
    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoints" / f"step-{args.steps:08d}")
    kimbho.Trainer(run, data, second, resume=True, progress_bar=False).fit()
    want = [r["loss"] for r in records if r["step"] > half]
    got = [r["loss"] for r in read_metrics(second, "train") if r["step"] > half]
    worst = max(abs(a - b) for a, b in zip(want, got, strict=True))
    results["resume"] = {"steps_compared": len(got), "max_loss_difference": worst}
    say(f"save at step {half} and resume: {len(got)} steps, largest loss difference {worst:.2e}")
    if len(got) != half or worst > args.resume_tolerance:
        failures.append(f"resumed losses differ by {worst:.2e} (tolerance {args.resume_tolerance})")

    # 3. Decoding with the compiled step, batch 1 and 32.
    model, _ = kimbho.load(first, device=args.device, dtype="auto")
    compiled = args.compile == "true"
    decode = {}
    for batch in (1, 32):
        prompts = [[1, *range(10 + i, 26 + i)] for i in range(batch)]
        kimbho.generate_batch(model, prompts, args.decode_tokens, compile=compiled)  # compile, capture
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        rows = kimbho.generate_batch(model, prompts, args.decode_tokens, compile=compiled)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        new = sum(len(r) - len(p) for r, p in zip(rows, prompts, strict=True))
        decode[f"batch_{batch}_tokens_per_sec"] = round(new / seconds)
        say(f"decode batch {batch}: {new / seconds:,.0f} tokens/s ({args.decode_tokens} new tokens each)")
    results["decode"] = {"dtype": str(model.embed.weight.dtype).removeprefix("torch."), **decode}

    # 4. The same weights on the device and on the CPU.
    ids = torch.randint(
        2, run.model.vocab_size, (2, min(64, args.seq_len)), generator=torch.Generator().manual_seed(0)
    )
    cpu_model, _ = kimbho.load(first, device="cpu", dtype="fp32")
    with torch.no_grad():
        reference = cpu_model(ids)
        parity = {}
        for label in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
            on_device, _ = kimbho.load(first, device=args.device, dtype=label)
            logits = on_device(ids.to(device)).float().cpu()
            parity[label] = {
                "max_abs_logit_difference": (logits - reference).abs().max().item(),
                "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            }
            say(
                f"logits on {name} ({label}) vs the CPU (fp32): max difference "
                f"{parity[label]['max_abs_logit_difference']:.2e}, argmax agreement {parity[label]['argmax_agreement']:.3f}"
            )
    results["parity"] = parity
    if parity["fp32"]["max_abs_logit_difference"] > 1e-2:  # TF32 is off by default for matmuls
        failures.append("fp32 logits differ from the CPU's by more than 1e-2")

    results["precision_auto"] = str(pick_precision("auto", device)).removeprefix("torch.")
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["failures"] = failures
    save_results(args.out, results)
    say(f"{'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}; wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
