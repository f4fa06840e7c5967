"""Decode speed: Kimbho against Hugging Face `LlamaForCausalLM.generate` on the same weights, in
one process, on the same prompts (random ids, greedy, no end-of-text so every run makes every
token).

    python bench/decode.py                   # `small`: fp32 batch 1 and 8, time to first token, bf16
    python bench/decode.py --compile         # also Kimbho with its compiled decode step
    python bench/decode.py --preset tiny --new-tokens 16 --repeats 1    # a quick check

Rows: tokens/s of the whole `generate` call (prefill included), time to first token for a
256-token prompt (prefill and the first token; Hugging Face: `generate(max_new_tokens=1)`), and
the peak memory a call adds (CUDA: allocator peak; CPU: resident set size sampled every
millisecond, minus what it was before the call). Each timing is the best of `--repeats` runs after
a warm-up. The `small` preset's context is raised to 512 so a 256-token prompt leaves room.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kimbho
from kimbho.engine import Engine, Request
from kimbho.interop.hf import config_to_hf, to_hf


@dataclass
class Measured:
    seconds: float
    peak_mib: float
    tokens: list[list[int]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], list[list[int]]], device: torch.device, repeats: int) -> Measured:
    """Best wall time of `repeats` calls after a warm-up, then the memory one more call adds
    (measured apart: on a 2-core CPU the sampling thread would slow the timed calls)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return Measured(best, peak_memory_mib(fn, device), tokens)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Memory one call of `fn` adds at its peak: the CUDA allocator's peak, or on the CPU the
    resident set size sampled every millisecond, minus what it was before the call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before, top, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            top[0] = max(top[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return (max(top[0], _rss_bytes()) - before) / 2**20


def kimbho_run(model: kimbho.KimbhoV1Model, prompts: torch.Tensor, new: int, compile: bool | None):
    def run() -> list[list[int]]:
        engine = Engine(model, slots=len(prompts), max_len=prompts.shape[1] + new, compile=compile)
        out: list[list[int]] = [[] for _ in prompts]
        for event in engine.run([Request(p, new) for p in prompts]):
            out[event.request_id].append(event.token)
        return out

    return run


def hf_run(hf: torch.nn.Module, prompts: torch.Tensor, new: int):
    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(  # type: ignore[operator]
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, prompts.shape[1] :].tolist()

    return run


def hf_twin(model: kimbho.KimbhoV1Model) -> torch.nn.Module:
    """A `LlamaForCausalLM` holding exactly `model`'s weights (through Kimbho's export key map)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.config)))
    hf.load_state_dict(to_hf(model.state_dict(), model.config), strict=not model.config.tie_embeddings)
    hf.generation_config.eos_token_id = None
    return hf.to(model.embed.weight.device, model.embed.weight.dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ttft-prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time Kimbho's compiled decode step")
    parser.add_argument("--bf16-tokens", type=int, default=16, help="new tokens of the bf16 rows (0: skip)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = kimbho.KimbhoConfig.from_preset(args.preset)
    cfg = kimbho.KimbhoConfig.from_preset(
        args.preset, max_seq_len=max(cfg.max_seq_len, args.ttft_prompt + 64)
    )
    model = kimbho.KimbhoV1Model(cfg).to(device).eval()
    hf = hf_twin(model)
    print(
        f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy"
    )
    rows: list[tuple[str, str, str, str, str]] = []
    kimbho_b1 = None

    def vocab_prompts(batch: int, length: int) -> torch.Tensor:
        return torch.randint(5, cfg.vocab_size, (batch, length), device=device)

    variants: list[tuple[str, bool | None]] = [("eager", False)] + (
        [("compiled", True)] if args.compile else []
    )
    for batch in args.batch:
        prompts = vocab_prompts(batch, args.prompt_tokens)
        total = batch * args.new_tokens
        theirs = measure(hf_run(hf, prompts, args.new_tokens), device, args.repeats)
        for name, compile in variants:
            if compile:
                started = time.perf_counter()
                kimbho_run(model, prompts, 2, compile)()
                print(f"  compiling the decode step for batch {batch}: {time.perf_counter() - started:.1f} s")
            ours = measure(kimbho_run(model, prompts, args.new_tokens, compile), device, args.repeats)
            same = "same" if ours.tokens == theirs.tokens else "DIFFERENT"
            if batch == 1 and name == "eager":
                kimbho_b1 = total / ours.seconds
            rows.append(
                (
                    f"fp32 batch {batch}, Kimbho {name}",
                    f"{total / ours.seconds:,.0f} vs {total / theirs.seconds:,.0f}",
                    f"**{theirs.seconds / ours.seconds:.2f}x**",
                    f"{ours.peak_mib:.0f} vs {theirs.peak_mib:.0f}",
                    f"{same} tokens",
                )
            )
            print(f"  {rows[-1]}")
        if batch != 1 and kimbho_b1:
            ours_tps = float(rows[-len(variants)][1].split(" vs ")[0].replace(",", ""))
            print(f"  batch {batch} / batch 1 aggregate tokens/s (Kimbho eager): {ours_tps / kimbho_b1:.2f}x")

    # Time to first token: prefill of a long prompt plus the first token.
    prompt = vocab_prompts(1, args.ttft_prompt)
    ours = measure(kimbho_run(model, prompt, 1, False), device, args.repeats)
    theirs = measure(hf_run(hf, prompt, 1), device, args.repeats)
    step = measure(hf_run(hf, vocab_prompts(1, args.prompt_tokens), args.new_tokens), device, 1).seconds
    hf_step = step / args.new_tokens
    rows.append(
        (
            f"time to first token, {args.ttft_prompt}-token prompt",
            f"{ours.seconds * 1e3:.1f} ms vs {theirs.seconds * 1e3:.1f} ms",
            f"**{theirs.seconds / ours.seconds:.2f}x**",
            f"{ours.peak_mib:.0f} vs {theirs.peak_mib:.0f}",
            f"= {ours.seconds / hf_step:.1f} HF decode steps ({hf_step * 1e3:.1f} ms each)",
        )
    )
    print(f"  {rows[-1]}")

    if args.bf16_tokens:
        model16, hf16 = model.to(torch.bfloat16), hf.to(torch.bfloat16)
        prompts = vocab_prompts(1, args.prompt_tokens)
        ours = measure(kimbho_run(model16, prompts, args.bf16_tokens, False), device, 1)
        theirs = measure(hf_run(hf16, prompts, args.bf16_tokens), device, 1)
        rows.append(
            (
                f"bf16 batch 1 ({args.bf16_tokens} new tokens)",
                f"{args.bf16_tokens / ours.seconds:,.1f} vs {args.bf16_tokens / theirs.seconds:,.1f}",
                f"**{theirs.seconds / ours.seconds:.2f}x**",
                f"{ours.peak_mib:.0f} vs {theirs.peak_mib:.0f}",
                "same tokens" if ours.tokens == theirs.tokens else "different tokens (bf16 rounding)",
            )
        )
        print(f"  {rows[-1]}")

    print()
    print(
        "| run | Kimbho vs Hugging Face (tokens/s or time) | speed-up | peak MiB added (Kimbho vs HF) | check |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
