"""Choosing where and in what precision to run.

CPU and CUDA differ in one place only: this module. bf16 pays on CUDA GPUs of compute capability
8.0 or newer (Ampere+) and on CPUs with AMX tiles or AVX512-BF16; elsewhere (for example AVX2-only
CPUs, where PyTorch emulates bf16 matrix products and they run ~60x slower than fp32) `auto`
picks fp32.

`KIMBHO_CPU_BF16=1` (or `0`) makes the CPU report native bf16 (or not) whatever it has, so the
test suite can be run on any machine as a bf16 CPU (or an fp32 one) would run it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from collections.abc import Iterator

import torch

from .errors import KimbhoError
from .inference.defaults import INFERENCE_DTYPES


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KimbhoError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KimbhoError("device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KimbhoError("device mps was asked for, but this PyTorch has no Apple MPS support")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (not emulated) on `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


CPU_BF16_ENV = "KIMBHO_CPU_BF16"


def _cpu_has_native_bf16() -> bool:
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise KimbhoError(
            f"{CPU_BF16_ENV}={forced!r}: use 1 (treat the CPU as bf16-native), 0, or leave it unset"
        )
    # Private probes of torch.cpu (present since 2.3); a missing probe counts as "no".
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, check, lambda: False)()) for check in checks)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `train.precision` (weights and optimizer state stay fp32)."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    raise KimbhoError(f"unknown precision {name!r}; use auto, fp32 or bf16")


def pick_inference_dtype(name: str, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The weight dtype for `--dtype` at inference. `auto` keeps the checkpoint's precision
    (`stored`) where `device` computes in it natively, and fp32 otherwise: a bf16 checkpoint on
    an AVX2-only CPU would run ~60x slower as it is (fp16 weights compute in fp32 on a CPU)."""
    if name == "auto":
        if stored == torch.bfloat16 and fast_bf16(device):
            return torch.bfloat16
        if stored == torch.float16 and device.type == "cuda":
            return torch.float16
        return torch.float32
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    raise KimbhoError(f"unknown dtype {name!r}; use {', '.join(INFERENCE_DTYPES)}")


COMPILE_DECODE_ENV = "KIMBHO_COMPILE_DECODE"


def compile_decode(requested: bool | None, device: torch.device) -> bool | None:
    """How generation runs its decode step: the one decision every caller reads (the engine, the
    slot length and slot count it is built with). True: compiled before the first step; False:
    eager; None: eager until the compiled step is ready, then compiled.

    `requested=None` picks by device: CUDA True (a captured graph is several times faster); the
    CPU None: its compiled step is built once per machine and model shape, in the background,
    and loaded in milliseconds after that (`inference/decode_package.py`); other devices False.
    `KIMBHO_COMPILE_DECODE=0` makes the CPU's pick False (eager), `1` True (wait for the build)."""
    if requested is not None:
        return bool(requested)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    forced = os.environ.get(COMPILE_DECODE_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise KimbhoError(f"{COMPILE_DECODE_ENV}={forced!r}: use 1 (compile), 0 (eager), or leave it unset")
    return (forced == "1") if forced else None


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor as the system names it ("GenuineIntel", "AuthenticAMD"), or "" where it
    cannot be read (not Linux). MKL's matrix products take their fast paths on Intel only, which
    the compiled decode step's choices follow (`inference/small_matmul.py`)."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def hand_over_cpu_threads() -> bool:
    """Release the OpenMP threads this thread has run PyTorch's parallel CPU work on, before
    another thread takes that work over (the server's engine thread: `serve/app.py`); whether
    there were GNU OpenMP threads to release.

    GNU OpenMP (the one PyTorch's Linux wheels ship) keeps a pool of threads for each thread that
    has run parallel work. With the model built on one thread and decoded on another, the two
    pools together outnumber the cores, and the decoding pool waits at its barriers sleeping
    instead of spinning: a compiled decode step of `small` took 5.9 ms instead of 1.1 (2 cores of
    an Intel Sapphire Rapids), and the server streamed one client a quarter of the engine's own
    speed (docs/serving.md). `omp_pause_resource_all` ends the calling thread's pool; it comes
    back if this thread runs parallel work again. Elsewhere (another OpenMP, another system) this
    does nothing."""
    library = _gnu_openmp()
    return library is not None and library.omp_pause_resource_all(1) == 0  # 1: omp_pause_soft


@functools.cache
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP library this process has loaded (PyTorch's copy), if any."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "/libgomp" in line), None)
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


def adamw_fused(device: torch.device) -> bool:
    """Whether PyTorch has a fused AdamW kernel for `device` (CUDA, and the CPU since 2.4; faster
    than the foreach version: docs/performance.md)."""
    return device.type in ("cuda", "cpu")


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's measured matrix-product throughput in FLOP/s at `dtype`: the best of square
    products of growing size. The denominator of model FLOPs utilisation (MFU); measured once per
    process and device, since spec sheets say little about a shared or throttled machine."""
    return _measured_peak(str(device), dtype, torch.get_num_threads())


@functools.cache
def _measured_peak(device_name: str, dtype: torch.dtype, threads: int) -> float:
    device = torch.device(device_name)
    # A private generator: measuring must not move the global RNG, or a run's dropout masks would
    # depend on whether this process had measured already (and resuming would not be exact).
    generator = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for n in (256, 512, 1024, 2048, 4096, 8192):
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        seconds, reps = 0.0, 0
        a @ b  # warm-up: kernel selection, first-touch allocation
        _sync(device)
        start = time.perf_counter()
        while seconds < 0.05:  # long enough to average out timer noise
            a @ b
            _sync(device)
            reps += 1
            seconds = time.perf_counter() - start
        per_product = seconds / reps
        best = max(best, 2 * n**3 / per_product)
        # Stop once a single product takes long enough to be compute-bound: bigger sizes only
        # cost time (an emulated bf16 product of 1024^2 takes a second on an AVX2 CPU).
        if per_product > 0.02:
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for the forward pass: bf16 matrix products, fp32 weights. A no-op in fp32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
