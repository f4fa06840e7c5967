"""The CPU's compiled decode step, built ahead of time once per machine and loaded in milliseconds.

`decode_step` for one model shape (config, tensor dtypes, int8 or not, slot count, slot length)
and one bucket of leading slots (1, 2, 4, ..., all: the rows a step covers) is exported
(`torch.export`) and compiled by AOTInductor, with `small_matmul`'s rewrite, into a package
under the cache directory. The number of cached positions a step attends to is a dynamic
dimension of the package: a step reads the keys and values filled so far, not the whole cache
(on `small`, 3.71 against 4.27 ms a step at 144 of 512 positions, fp32). The package holds code
only: the weights and the cache are the caller's tensors, bound at load time, so every model of
that shape (every `small` run, say) shares one package, and loading it costs about 10 ms
instead of the seconds that tracing for `torch.compile` costs in every process, even with a warm
Inductor cache.

A package is built by a separate process (`python -m kimbho.inference.decode_package SPEC`), at
low priority: building in the engine's own process would hold its interpreter lock through
tracing and lowering and stall the eager decoding it is meant to replace. The engine decodes
eager meanwhile and switches once the package appears; a build outlives a short-lived parent,
so the next process finds it. One builder makes an engine's missing buckets, smallest first.
Builds are atomic (written aside, then renamed), one per package at a time (a lock file naming
the builder), and a failed one leaves a `.failed` note, read instead of retrying at every start.

The cache directory is `$KIMBHO_CACHE_DIR/decode`, else `$XDG_CACHE_HOME/kimbho/decode`, else
`~/.cache/kimbho/decode`. Package names hash everything the code depends on: the shape, the
torch version, Kimbho's model and decode sources, and the CPU's vector ISA.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import cpu_vendor
from ..errors import KimbhoError
from ..model import KimbhoV1Model, KVCache
from . import cpu_kernels
from .decode_step import Step, decode_step

log = logging.getLogger("kimbho")

CACHE_DIR_ENV = "KIMBHO_CACHE_DIR"

# The fewest positions a package attends to (export makes lengths 0 and 1 static).
SHORTEST = 2

# Between looks for a package being built (a stat of one file).
_LOOK_EVERY_S = 0.5

# Loaded packages, by file and the tensors bound to them, least recently used first.
_LOADED: dict[tuple[str, tuple[int, ...]], tuple[Any, dict[str, torch.Tensor]]] = {}
_KEEP_LOADED = 8
_WARNED: set[str] = set()  # packages this process has said it cannot use


def cache_dir() -> Path:
    """Where decode packages live (see the module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root) / "decode"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kimbho" / "decode"


class _Step(nn.Module):
    """`decode_step` as a module, the shape torch.export takes: over the leading positions its
    key and value inputs hold (a dynamic dimension of the package). Its constants are the
    model's weights and rotary tables, named `model.<name>`."""

    def __init__(self, model: KimbhoV1Model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        return decode_step(self.model, tokens, positions, keys, values, keys.shape[3])


def _constants(model: KimbhoV1Model) -> dict[str, torch.Tensor]:
    """The tensors a package binds, by the names export gives them (tied ones under each name)."""
    step = _Step(model)
    named: dict[str, torch.Tensor] = dict(step.named_parameters(remove_duplicate=False))
    named.update(step.named_buffers(remove_duplicate=False))
    return named


def spec_of(model: KimbhoV1Model, cache: KVCache, rows: int) -> dict[str, Any]:
    """Everything a builder needs to rebuild `model`'s shape, with the signature of its constants
    (names, dtypes, shapes) that the rebuilt model must match. `rows`: the package steps the
    first `rows` slots of the cache (a view of it, whose strides it is compiled for)."""
    from ..model.quantize import is_quantized

    return {
        "config": model.config.to_dict(),
        "int8": is_quantized(model),
        "slots": cache.slots,
        "rows": rows,
        "max_len": cache.max_len,
        "cache": str(cache.keys.dtype).removeprefix("torch."),
        "constants": _signature(model),
    }


def _signature(model: KimbhoV1Model) -> list[list[Any]]:
    return [[n, str(t.dtype), list(t.shape)] for n, t in sorted(_constants(model).items())]


def package_name(spec: dict[str, Any]) -> str:
    """The package's file name: a hash of `spec` and of everything the compiled code depends on."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(_code_identity())
    return f"decode-{digest.hexdigest()[:24]}"


@functools.cache
def _code_identity() -> bytes:
    """What the compiled code depends on besides the shape: the torch version, the CPU's vector
    ISA and vendor, the platform, and Kimbho's model and decode sources. Read once a process: `generate`
    names its packages at every call."""
    here = Path(__file__).resolve().parent
    sources = sorted((here.parent / "model").glob("*.py")) + [
        here / "decode_step.py",
        here / "small_matmul.py",
        here / "cpu_kernels.py",
        here / "cpu_kernels.cpp",
        here / "decode_package.py",
    ]
    digest = hashlib.sha256()
    for part in (
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        cpu_vendor(),  # the products the step leaves to MKL (`small_matmul.few_rows`)
        platform.machine(),
        f"{sys.version_info[0]}.{sys.version_info[1]}",
    ):
        digest.update(part.encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.digest()


class _Package:
    """One package's files: NAME.pt2 (complete or absent), NAME.lock (a build is under way; it
    names the builder's pid), NAME.failed (why its build failed), NAME.log (the builder's output)."""

    def __init__(self, directory: Path, spec: dict[str, Any]) -> None:
        self.spec, self.rows = spec, spec["rows"]
        self.name = package_name(spec)
        self.path = directory / f"{self.name}.pt2"
        self.lock, self.failed = self.path.with_suffix(".lock"), self.path.with_suffix(".failed")
        self.log = self.path.with_suffix(".log")
        self.runner: Any = None
        self.gave_up = False


class PackagedSteps:
    """The compiled decode steps of one engine on the CPU, one package per bucket of rows (1, 2,
    4, ... and all slots): a step over few slots reads the weights at memory speed and skips the
    idle slots' attention, so one client of an 8-slot server runs at a lone stream's speed.

    Missing packages are built, smallest first, by one background process; `wait=True` blocks
    until all are (compile=True). `step_for(rows, length)` is the smallest loaded bucket's step."""

    def __init__(self, model: KimbhoV1Model, cache: KVCache, buckets: list[int], wait: bool) -> None:
        directory = cache_dir()
        self.constants = _constants(model)
        self.max_len = cache.max_len
        spec = spec_of(model, cache, buckets[0])  # the buckets differ in their rows only
        if self.max_len <= SHORTEST:  # no length of a package: every step is eager
            buckets = []
        self.packages = [_Package(directory, {**spec, "rows": rows}) for rows in buckets]
        self._builder: subprocess.Popen[bytes] | None = None
        self._next_look = 0.0
        wanted = [p for p in self.packages if not self._load(p) and not p.failed.exists()]
        if wanted:
            self._builder = _start_build(wanted, directory)
        self._look()
        if wait and not self.wait():
            reasons = "; ".join(p.failed.read_text().strip() for p in self.packages if p.failed.exists())
            raise KimbhoError(
                f"compiling the decode step failed ({reasons or 'no package was written'}); generate "
                f"eager instead (compile=False, or KIMBHO_COMPILE_DECODE=0)"
            )

    @property
    def ready(self) -> bool:
        """Whether every bucket's step is loaded."""
        return all(p.runner is not None for p in self.packages)

    def step_for(self, rows: int, length: int) -> tuple[int, int, Step] | None:
        """The smallest loaded bucket of at least `rows` slots, over `length` positions, and its
        step; or None (decode eager). The cache's very last position, which one step of a
        sequence that fills the whole cache reaches, is decoded eager too: a package's length is
        at most `max_len - 1`, as a view that is not the whole tensor (the whole tensor is a
        contiguous input, which export compiles apart)."""
        if not self.ready and time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + _LOOK_EVERY_S
            self._look()
        if length >= self.max_len:
            return None
        return next(
            (
                (p.rows, max(length, SHORTEST), p.runner)
                for p in self.packages
                if p.rows >= rows and p.runner is not None
            ),
            None,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every bucket is built and loaded (or `timeout` seconds pass, or a build
        fails); whether all are ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and not any(p.gave_up for p in self.packages):
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.1)
            self._look()
        return self.ready

    def _look(self) -> None:
        """Load the packages that are there; give up on those whose build ended without one."""
        for package in self.packages:
            if package.runner is not None or package.gave_up:
                continue
            # Whether the build had ended is read before looking for its package, which it writes
            # before it ends: an ended build and no package is a failed build, never a race.
            ended = not package.lock.exists() or (
                self._builder is not None and self._builder.poll() is not None
            )
            if self._load(package) or package.gave_up:
                continue
            if package.failed.exists():
                why = package.failed.read_text().strip()
                self._give_up(package, f"{why}; see {package.log}, delete {package.failed} to retry")
            elif ended:
                self._give_up(package, f"its build ended without a package; see {package.log}")

    def _load(self, package: _Package) -> bool:
        # A package bound to these very tensors is reused: `generate` builds an engine per call.
        key = (str(package.path), tuple(t.data_ptr() for _, t in sorted(self.constants.items())))
        if key in _LOADED:
            _LOADED[key] = _LOADED.pop(key)  # now the most recently used
            package.runner = _LOADED[key][0]
            return True
        if not package.path.exists():
            return False
        try:
            runner = _load_runner(package.path, self.constants)
        except Exception as e:  # a damaged package: drop it, so the next process builds anew
            package.path.unlink(missing_ok=True)
            self._give_up(
                package, f"{package.path} could not be loaded ({type(e).__name__}: {e}); removed it"
            )
            return False
        package.runner = runner
        _LOADED[key] = (runner, self.constants)  # the tensors live as long as the runner reads them
        while len(_LOADED) > _KEEP_LOADED:
            _LOADED.pop(next(iter(_LOADED)))  # the least recently used, and the weights it holds
        return True

    def _give_up(self, package: _Package, reason: str) -> None:
        package.gave_up = True
        if package.name in _WARNED:
            return  # once a process: `generate` builds an engine per call
        _WARNED.add(package.name)
        log.warning(
            "the compiled decode step for %d slot(s) is not available (%s); decoding eager",
            package.rows,
            reason,
        )


def _load_runner(path: Path, constants: dict[str, torch.Tensor]) -> Step:
    """The package at `path` as a step, `constants` bound to it. Through AOTInductor's C++
    loader itself: `torch._inductor.aoti_load_package` would import Inductor (2.1 s of every
    process's start, measured) and parse the call's tree spec at every step."""
    kernels = cpu_kernels.library_path(path.parent)
    if kernels.exists():  # the shims the package's code calls (`cpu_kernels`)
        cpu_kernels.load_library(kernels)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    # (map, use_inactive, check_full_update, user_managed: the model's own tensors, not copies,
    # allow_h2d_copy)
    loader.load_constants({n: constants[n] for n in loader.get_constant_fqns()}, False, True, True, False)

    def step(
        tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        # `run`, not `boxed_run`: as fast, and it releases the interpreter lock while the step
        # runs, so the server's event loop streams the last token meanwhile (`boxed_run` held
        # it: the loop waited for Python's 5 ms switch interval, a token took 7.5 ms to stream).
        return loader.run([tokens, positions, keys, values])[0]

    return step


def _start_build(packages: list[_Package], directory: Path) -> subprocess.Popen[bytes] | None:
    """Start one builder for those of `packages` no other process is building, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    mine = [p for p in packages if _claim(p.lock)]
    if not mine:
        return None
    for package in mine:
        (directory / f"{package.name}.json").write_text(json.dumps(package.spec))
    with open(mine[0].log, "wb") as out:
        builder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kimbho.inference.decode_package",
                *(str(directory / f"{p.name}.json") for p in mine),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # finishes even if this process is interrupted
        )
    for package in mine:
        package.lock.write_text(str(builder.pid))
        package.log = mine[0].log  # one builder, one log
    log.info(
        "building the compiled decode step for this model's shape in the background (once per "
        "machine, about a minute per slot bucket); decoding eager until it is ready"
    )
    return builder


def _claim(lock: Path) -> bool:
    """Take `lock` for a build, unless a live process holds it (a dead one's is taken over)."""
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        if _alive(lock):
            return False
        lock.unlink(missing_ok=True)
        return _claim(lock)


def _alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text() or "0")
    except (OSError, ValueError):
        return True  # being written this moment
    if pid <= 0:
        return time.time() - lock.stat().st_mtime < 10  # its writer has not named the builder yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(spec_file: Path) -> None:
    """Build one package: rebuild the model shape of `spec_file` (zeros: the values are not
    compiled in), check it against the signature, export, compile, rename into place."""
    from ..config import KimbhoConfig
    from ..model.quantize import quantize_int8
    from .small_matmul import SmallMatmulPass, few_rows

    spec = json.loads(spec_file.read_text())
    directory, name = spec_file.parent, spec_file.stem
    try:
        config = KimbhoConfig.from_dict(spec["config"])
        with torch.device("meta"):
            model = KimbhoV1Model(config)
        model = model.to_empty(device="cpu")
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data.zero_()
        if spec["int8"]:
            quantize_int8(model)
        # Each tensor in the engine's dtype: `load` casts the weights only, `model.to` buffers too.
        dtypes = {fqn: getattr(torch, dtype.removeprefix("torch.")) for fqn, dtype, _ in spec["constants"]}
        for fqn, tensor in _constants(model).items():
            if fqn in dtypes:
                tensor.data = tensor.data.to(dtypes[fqn])
        if _signature(model) != spec["constants"]:
            raise RuntimeError("the rebuilt model's tensors differ from the engine's model")
        cache = model.new_cache(spec["slots"], spec["max_len"], dtype=getattr(torch, spec["cache"]))
        rows = spec["rows"]
        # Two tensors, not one twice: export would bind both arguments to the one input.
        tokens, positions = (torch.zeros(rows, dtype=torch.long) for _ in range(2))
        longest = spec["max_len"] - 1
        length = torch.export.Dim("length", min=SHORTEST, max=longest)
        example = min(longest, 64)  # any length: the code is the same for all of them
        cut = (slice(None), slice(None, rows), slice(None), slice(None, example))
        inputs = (tokens, positions, cache.keys[cut], cache.values[cut])
        with torch.no_grad():
            exported = torch.export.export(
                _Step(model.eval()), inputs, dynamic_shapes=(None, None, {3: length}, {3: length})
            )
        partial = directory / f"{name}.partial.pt2"
        cpu_kernels.build_library(directory)
        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(partial),
            inductor_configs={
                "post_grad_custom_post_pass": SmallMatmulPass(few_rows()),
                "aot_inductor.package_constants_in_so": False,  # code only: weights bound at load
                # Kimbho's kernels called directly (their library is loaded before the package).
                "aot_inductor.custom_ops_to_c_shims": cpu_kernels.C_SHIMS,
            },
        )
        os.replace(partial, directory / f"{name}.pt2")
    except Exception as e:
        (directory / f"{name}.failed").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        (directory / f"{name}.lock").unlink(missing_ok=True)
        spec_file.unlink(missing_ok=True)


def main(spec_files: list[Path]) -> None:
    """The builder process: each package in turn, at low priority (the user's decoding comes
    first); one that fails does not stop the others. Its log is kept only if one failed."""
    os.nice(10)
    failed = False
    for spec_file in spec_files:
        try:
            build(spec_file)
        except Exception:
            import traceback

            traceback.print_exc()
            failed = True
    if not failed:
        (spec_files[0].parent / f"{spec_files[0].stem}.log").unlink(missing_ok=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
