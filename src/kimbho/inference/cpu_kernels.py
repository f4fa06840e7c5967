"""Kimbho's own CPU kernels for the compiled decode step: few-row products by fp32, bf16 and int8 weights.

A decode step multiplies a few rows by every weight matrix, so its speed is how fast the weights
are read. MKL reads them on one thread; the Inductor reductions that replaced it read fp32 at the
memory's speed, but for int8 and bf16 weights the code Inductor writes spent more time
converting each weight than reading it (on an AVX2 Zen 3 the int8 step of `small` took 8.4 ms,
its int32 loads going through the stack, and the bf16 one 1.46 ms against fp32's 1.63, for half
the bytes). The kernels of `cpu_kernels.cpp` read every dtype at the memory's speed, with inner
loops a compiler does not find for us (docs/generation.md, Decode speed): int8 weights against
the input rows rounded to int16 (`vpmaddwd`, exact int32 sums), bf16 weights split into fp32 by
one shift and one mask, fp32 weights read once.

They are two operators, `kimbho::int8_linear(x, weight)` and `kimbho::linear(x, weight)` (x @
weight.T; fp32 or bf16 weights), that `small_matmul`'s pass writes into the step's graph, and
AOTInductor C shims (`C_SHIMS`): the package's code calls them directly. Their library is
compiled once per machine by the package builder, with Inductor's own compiler settings (the
same vector ISA and OpenMP), and is loaded into a process before a package that calls it. In
Python the operators run a reference version of the same arithmetic, used by the tests and by
anything that runs the graph outside a package.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

# Where the kernels have their vector code (x86 with AVX2 and FMA, AVX512 CPUs included, which run
# the AVX2 code). Elsewhere they would run their plain loops, slower than the products they
# replace, so the graph pass leaves those alone.
VECTORIZED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

_LIB = torch.library.Library("kimbho", "DEF")
_LIB.define("int8_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.define("linear(Tensor x, Tensor weight) -> Tensor")
# The shims' C declarations, by operator: AOTInductor declares them in the package's code and
# calls them in place of the operator.
C_SHIMS = {
    torch.ops.kimbho.int8_linear.default: [
        "AOTITorchError aoti_torch_cpu_int8_linear(AtenTensorHandle x, AtenTensorHandle weight, "
        "AtenTensorHandle* ret0)"
    ],
    torch.ops.kimbho.linear.default: [
        "AOTITorchError aoti_torch_cpu_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0)"
    ],
}


@torch.library.register_fake("kimbho::int8_linear")
def _int8_linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("kimbho::linear")
def _linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.impl("kimbho::int8_linear", "CPU")
def int8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T, weight in int8, as the kernel computes it: each row of x
    rounded to int16 with its own scale, exact integer sums, times the row's scale."""
    x32 = x.float()
    row_scales = x32.abs().amax(dim=1, keepdim=True) / 32767
    row_scales = torch.where(row_scales > 0, row_scales, torch.ones_like(row_scales))
    xq = (x32 * (1 / row_scales)).round().clamp(-32767, 32767)  # as the kernel rounds
    # float64 holds every int32 sum exactly.
    sums = xq.double() @ weight.double().T
    return (sums.float() * row_scales).to(x.dtype)


@torch.library.impl("kimbho::linear", "CPU")
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T, weight in fp32 or bf16, summed in fp32 (the kernel's arithmetic)."""
    return (x.float() @ weight.float().T).to(x.dtype)


def library_path(directory: Path) -> Path:
    """Where the compiled kernels live in `directory`: named by their source and what it is
    compiled for (torch, whose headers and OpenMP it uses, and the vector ISA)."""
    return directory / f"libkimbho_kernels-{_identity()}.so"


@functools.cache
def _identity() -> str:
    """The library's name part, read once a process (every package load asks for it)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(torch.backends.cpu.get_cpu_capability().encode())
    return digest.hexdigest()[:16]


def build_library(directory: Path) -> Path:
    """Compile the kernels into `directory` unless they are there (the package builder calls
    this before compiling a package that uses them); returns the library's path. Written aside
    and renamed into place: a process that finds the file finds it whole."""
    from torch._inductor.cpp_builder import CppBuilder, CppTorchOptions
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    path = library_path(directory)
    if path.exists():
        return path
    partial = directory / f"{path.stem}.{os.getpid()}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    try:
        options = CppTorchOptions(vec_isa=pick_vec_isa(), include_pytorch=True, shared=True)
        builder = CppBuilder(path.stem, [str(SOURCE)], options, output_dir=str(partial))
        builder.build()
        os.replace(builder.get_target_file_path(), path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


@functools.cache
def load_library(path: Path) -> None:
    """Load the kernels into this process, their symbols global: a package's code, loaded
    after, finds its shims here."""
    ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
