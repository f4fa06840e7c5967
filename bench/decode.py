"""Decode speed: Kimbho's default path, eager, and its bf16 and int8 weights, against Hugging
Face `LlamaForCausalLM.generate` and llama.cpp (f32 and q8_0 GGUF files written by `kimbho export
gguf`, when `llama_cpp` is importable: `make llama-cpp`), all on the same weights in one process,
on the same prompts (random ids, greedy, no end-of-text so every run makes every token).

    python bench/decode.py                   # `small`: the batch-1 table, batch 8, time to first token
    python bench/decode.py --preset tiny --new-tokens 16 --repeats 1    # a quick check

Rows: tokens/s of the whole `generate` call (prefill included: an engine per call, as
`kimbho.generate` makes), time to first token for a 256-token prompt (prefill and the first
token; Hugging Face: `generate(max_new_tokens=1)`), and the peak memory a call adds (CUDA:
allocator peak; CPU: resident set size sampled every millisecond, minus what it was before the
call). Each timing is the best of `--repeats` runs after a warm-up, the runs of a table taking
turns so that a slow stretch of the machine slows all of them. "Same tokens" counts the new
tokens equal to fp32 eager Kimbho's, position by position. The `small` preset's context is raised
to 512 so a 256-token prompt leaves room.

The default path is the compiled decode step, built once per machine and shape
(`inference/decode_package.py`): the first-call section times that build in an empty cache
(cold), and an engine's start with the package there (warm). Built packages stay in the user's
cache, so the timed rows never include a build.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from _common import cpu_name, gguf_twin, hf_model, llama_cpp_available, llama_cpp_run

import kimbho
from kimbho.inference.decode_package import CACHE_DIR_ENV
from kimbho.inference.engine import Engine
from kimbho.interop.hf import to_hf
from kimbho.model.quantize import quantize_int8


@dataclass
class Measured:
    seconds: float
    peak_mib: float
    tokens: list[list[int]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_all(
    runs: dict[str, Callable[[], list[list[int]]]], device: torch.device, repeats: int
) -> dict[str, Measured]:
    """Each run's best wall time of `repeats` calls after a warm-up, the runs taking turns (one
    call of each per round: a stretch where the machine runs slower slows all of them, so the
    ratios hold), then the memory one more call adds (measured apart: on a 2-core CPU the
    sampling thread would slow the timed calls)."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for label, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens[label] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[label] = min(best[label], time.perf_counter() - start)
    return {
        label: Measured(best[label], peak_memory_mib(fn, device), tokens[label]) for label, fn in runs.items()
    }


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
    """`kimbho.generate_batch` as a user calls it (`compile=None`: the default path)."""

    def run() -> list[list[int]]:
        rows = kimbho.generate_batch(model, list(prompts), new, compile=compile)
        return [row[prompts.shape[1] :] for row in rows]

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


_NEW_PROCESS = """
import sys, time
started = time.perf_counter()
import torch, kimbho
config = kimbho.KimbhoConfig.from_dict(__import__("json").loads(sys.argv[1]))
model = kimbho.KimbhoV1Model(config).eval()
built = time.perf_counter()
kimbho.generate(model, torch.randint(5, config.vocab_size, (1, 16)), max_new_tokens=1, compile=sys.argv[2] == "1")
print(built - started, time.perf_counter() - built)
"""


def first_call(model: kimbho.KimbhoV1Model) -> None:
    """What the compiled step costs before it pays: its build in an empty cache (once per
    machine and shape; generation runs eager meanwhile), and in a new process, with it built, a
    first one-token `generate` (imports and building the model apart) against an eager one."""
    import json
    import subprocess
    import sys

    max_len = model.config.max_seq_len
    with tempfile.TemporaryDirectory() as empty, mock.patch.dict(os.environ, {CACHE_DIR_ENV: empty}):
        started = time.perf_counter()
        Engine(model, slots=1, max_len=max_len, compile=True)
        cold = time.perf_counter() - started
    Engine(model, slots=1, max_len=max_len, compile=True)  # built in the user's cache, if not yet
    calls = {}
    for compile in ("1", "0"):
        out = subprocess.run(
            [sys.executable, "-c", _NEW_PROCESS, json.dumps(model.config.to_dict()), compile],
            capture_output=True,
            text=True,
            check=True,
        )
        start, call = (float(x) for x in out.stdout.split())
        calls[compile] = (start, call)
    print(
        f"first call: building the compiled step (cold cache) {cold:.1f} s; in a new process with it "
        f"built, importing and building the model {calls['1'][0]:.2f} s, then a one-token generate "
        f"{calls['1'][1] * 1e3:.0f} ms (eager: {calls['0'][1] * 1e3:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="the batched rows' batch size (0: skip)")
    parser.add_argument("--ttft-prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip timing a build in an empty cache")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    context = max(kimbho.KimbhoConfig.from_preset(args.preset).max_seq_len, args.ttft_prompt + 64)
    cfg = kimbho.KimbhoConfig.from_preset(args.preset, max_seq_len=context)
    model = kimbho.KimbhoV1Model(cfg).to(device).eval()
    hf = hf_twin(model)
    threads = torch.get_num_threads()
    print(
        f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters, {device} ({cpu_name()}), torch "
        f"{torch.__version__}, {threads} threads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy"
    )

    def prompts_of(batch: int, length: int) -> torch.Tensor:
        return torch.randint(5, cfg.vocab_size, (batch, length), device=device)

    prompt, total = prompts_of(1, args.prompt_tokens), args.new_tokens
    if not args.no_cold and device.type == "cpu":
        first_call(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    int8 = quantize_int8(copy.deepcopy(model))
    for weights in (model, bf16, int8):  # built before timing (a no-op once in the cache)
        Engine(weights, slots=1, max_len=context, compile=True)

    eager = "Kimbho eager (`compile=False`), fp32"
    batch1 = {
        "Kimbho default (compiled step), fp32": kimbho_run(model, prompt, total, None),
        eager: kimbho_run(model, prompt, total, False),
        "Kimbho `--dtype bf16`": kimbho_run(bf16, prompt, total, None),
        "Kimbho `--dtype int8`": kimbho_run(int8, prompt, total, None),
        "Hugging Face `generate`, fp32": hf_run(hf, prompt, total),
    }
    with tempfile.TemporaryDirectory() as files:
        if llama_cpp_available() and device.type == "cpu":
            for dtype in ("f32", "q8_0"):
                path = gguf_twin(model, dtype, Path(files))
                batch1[f"llama.cpp {dtype}"] = llama_cpp_run(path, prompt, total, threads)
        else:
            print("llama_cpp is not importable (make llama-cpp): no llama.cpp rows")
        runs = measure_all(batch1, device, args.repeats)
    reference = runs[eager]
    llama = runs.get("llama.cpp f32")
    hf_seconds = runs["Hugging Face `generate`, fp32"].seconds
    print()
    print(f"batch 1, {args.new_tokens} new tokens after {args.prompt_tokens}:")
    print()
    print("| run | tokens/s | vs llama.cpp f32 | vs Hugging Face | same tokens as fp32 eager |")
    print("|---|---|---|---|---|")
    for label, m in runs.items():
        versus = f"{llama.seconds / m.seconds:.2f}x" if llama else "-"
        same = sum(a == b for a, b in zip(m.tokens[0], reference.tokens[0], strict=True))
        print(
            f"| {label} | {total / m.seconds:,.0f} | {versus} | {hf_seconds / m.seconds:.2f}x | {same}/{total} |"
        )

    table: list[str] = []

    def row(label: str, ours: Measured, theirs: Measured, tokens: int | None) -> None:
        """A line of the Hugging Face table: tokens/s (or milliseconds when `tokens` is None),
        speed-up, memory."""
        if tokens is None:
            speeds = f"{ours.seconds * 1e3:.1f} ms | {theirs.seconds * 1e3:.1f} ms"
        else:
            speeds = f"{tokens / ours.seconds:,.0f} | {tokens / theirs.seconds:,.0f}"
        same = "same" if ours.tokens == theirs.tokens else "different"
        table.append(
            f"| {label} | {speeds} | **{theirs.seconds / ours.seconds:.2f}x** | "
            f"{ours.peak_mib:.1f} / {theirs.peak_mib:.1f} | {same} tokens |"
        )

    if args.batch:
        prompts, total = prompts_of(args.batch, args.prompt_tokens), args.batch * args.new_tokens
        Engine(model, slots=args.batch, max_len=context, compile=True)  # built before timing
        batched = measure_all(
            {
                "hf": hf_run(hf, prompts, args.new_tokens),
                "default": kimbho_run(model, prompts, args.new_tokens, None),
                "eager": kimbho_run(model, prompts, args.new_tokens, False),
            },
            device,
            args.repeats,
        )
        for label in ("default", "eager"):
            row(
                f"fp32, batch {args.batch}, Kimbho {label} (aggregate tokens/s)",
                batched[label],
                batched["hf"],
                total,
            )
    long_prompt = prompts_of(1, args.ttft_prompt)
    first = measure_all(
        {"ours": kimbho_run(model, long_prompt, 1, None), "hf": hf_run(hf, long_prompt, 1)},
        device,
        args.repeats,
    )
    row(f"fp32, time to first token, {args.ttft_prompt}-token prompt", first["ours"], first["hf"], None)
    print()
    print("| run | Kimbho | Hugging Face | speed-up | peak MiB added, Kimbho / HF | check |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
