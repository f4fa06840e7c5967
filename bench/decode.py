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
from _common import hf_model

import kimbho
from kimbho.inference.engine import Engine, Request
from kimbho.interop.hf import to_hf


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
    hf = hf_model(model.config)
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
    context = max(kimbho.KimbhoConfig.from_preset(args.preset).max_seq_len, args.ttft_prompt + 64)
    cfg = kimbho.KimbhoConfig.from_preset(args.preset, max_seq_len=context)
    model = kimbho.KimbhoV1Model(cfg).to(device).eval()
    hf = hf_twin(model)
    print(
        f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy"
    )
    table: list[str] = []

    def row(label: str, ours: Measured, theirs: Measured, tokens: int | None) -> None:
        """A table line: tokens/s (or milliseconds when `tokens` is None), speed-up, memory."""
        if tokens is None:
            speeds = f"{ours.seconds * 1e3:.1f} ms | {theirs.seconds * 1e3:.1f} ms"
        else:
            speeds = f"{tokens / ours.seconds:,.0f} | {tokens / theirs.seconds:,.0f}"
        same = "same" if ours.tokens == theirs.tokens else "different"
        table.append(
            f"| {label} | {speeds} | **{theirs.seconds / ours.seconds:.2f}x** | "
            f"{ours.peak_mib:.1f} / {theirs.peak_mib:.1f} | {same} tokens |"
        )
        print(table[-1], flush=True)

    def prompts_of(batch: int, length: int) -> torch.Tensor:
        return torch.randint(5, cfg.vocab_size, (batch, length), device=device)

    hf_step = kimbho_b1 = compiled_b1 = 0.0
    for batch in args.batch:
        prompts, total = prompts_of(batch, args.prompt_tokens), batch * args.new_tokens
        theirs = measure(hf_run(hf, prompts, args.new_tokens), device, args.repeats)
        ours = measure(kimbho_run(model, prompts, args.new_tokens, False), device, args.repeats)
        row(f"fp32, batch {batch}", ours, theirs, total)
        if batch == 1:
            hf_step, kimbho_b1 = theirs.seconds / args.new_tokens, total / ours.seconds
        elif kimbho_b1:
            print(f"  Kimbho batch {batch} / batch 1, tokens/s: {total / ours.seconds / kimbho_b1:.2f}x")
        if args.compile:
            started = time.perf_counter()
            kimbho_run(model, prompts, 2, True)()
            print(f"  compiling the decode step for batch {batch}: {time.perf_counter() - started:.0f} s")
            compiled = measure(kimbho_run(model, prompts, args.new_tokens, True), device, args.repeats)
            row(f"fp32, batch {batch}, Kimbho compiled", compiled, theirs, total)
            if batch == 1:
                compiled_b1 = total / compiled.seconds
            elif compiled_b1:
                print(
                    f"  compiled: batch {batch} / batch 1, tokens/s: {total / compiled.seconds / compiled_b1:.2f}x"
                )

    prompt = prompts_of(1, args.ttft_prompt)
    ours = measure(kimbho_run(model, prompt, 1, False), device, args.repeats)
    theirs = measure(hf_run(hf, prompt, 1), device, args.repeats)
    row(f"fp32, time to first token, {args.ttft_prompt}-token prompt", ours, theirs, None)
    if hf_step:
        print(f"  = {ours.seconds / hf_step:.1f} Hugging Face decode steps of {hf_step * 1e3:.1f} ms")

    if args.bf16_tokens:
        model, hf = model.to(torch.bfloat16), hf.to(torch.bfloat16)
        for batch in args.batch:
            prompts, total = prompts_of(batch, args.prompt_tokens), batch * args.bf16_tokens
            theirs = measure(hf_run(hf, prompts, args.bf16_tokens), device, 1)
            ours = measure(kimbho_run(model, prompts, args.bf16_tokens, False), device, 1)
            row(f"bf16, batch {batch}, {args.bf16_tokens} new tokens", ours, theirs, total)
        ours = measure(kimbho_run(model, prompt, 1, False), device, 1)
        theirs = measure(hf_run(hf, prompt, 1), device, 1)
        row(f"bf16, time to first token, {args.ttft_prompt}-token prompt", ours, theirs, None)

    print()
    print("| run | Kimbho | Hugging Face | speed-up | peak MiB added, Kimbho / HF | check |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
