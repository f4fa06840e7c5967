"""The CPU's compiled decode step, built ahead of time once per machine and loaded in milliseconds.

`decode_step` for one model shape (config, weight dtype, int8 or not, slot count, slot length)
is exported (`torch.export`) and compiled by AOTInductor, with `small_matmul`'s rewrite, into a
package under the cache directory. The package holds code only: the weights and the cache are
the caller's tensors, bound at load time, so every model of that shape (every `small` run, say)
shares one package, and loading it costs about 10 ms instead of the seconds that tracing for
`torch.compile` costs in every process, even with a warm Inductor cache.

A package is built by a separate process (`python -m kimbho.inference.decode_package SPEC`), at
low priority: building in the engine's own process would hold its interpreter lock through
tracing and lowering and stall the eager decoding it is meant to replace. The engine decodes
eager meanwhile and switches once the package appears; a build outlives a short-lived parent,
so the next process finds it. Builds are atomic (written aside, then renamed), one per shape at
a time (a lock file naming the builder), and a failed one leaves a `.failed` note, read instead
of retrying at every start.

The cache directory is `$KIMBHO_CACHE_DIR/decode`, else `$XDG_CACHE_HOME/kimbho/decode`, else
`~/.cache/kimbho/decode`. Package names hash everything the code depends on: the shape, the
torch version, Kimbho's model and decode sources, and the CPU's vector ISA.
"""

from __future__ import annotations

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

from ..errors import KimbhoError
from ..model import KimbhoV1Model, KVCache

log = logging.getLogger("kimbho")

CACHE_DIR_ENV = "KIMBHO_CACHE_DIR"

# Between looks for a package being built (a stat of one file).
_LOOK_EVERY_S = 0.5


def cache_dir() -> Path:
    """Where decode packages live (see the module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root) / "decode"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kimbho" / "decode"


class _Step(nn.Module):
    """`decode_step` over the whole cache as a module, the shape torch.export takes. Its
    constants are the model's weights and rotary tables, named `model.<name>`."""

    def __init__(self, model: KimbhoV1Model, kv_len: int) -> None:
        super().__init__()
        self.model, self.kv_len = model, kv_len

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        from .decode_step import decode_step

        return decode_step(self.model, tokens, positions, keys, values, self.kv_len)


def _constants(model: KimbhoV1Model) -> dict[str, torch.Tensor]:
    """The tensors a package binds, by the names export gives them (tied ones under each name)."""
    step = _Step(model, 0)
    named: dict[str, torch.Tensor] = dict(step.named_parameters(remove_duplicate=False))
    named.update(step.named_buffers(remove_duplicate=False))
    return named


def spec_of(model: KimbhoV1Model, cache: KVCache) -> dict[str, Any]:
    """Everything a builder needs to rebuild `model`'s shape, and the signature of its constants
    (names, dtypes, shapes) that the rebuilt model must match."""
    from ..model.quantize import is_quantized

    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return {
        "config": model.config.to_dict(),
        "weights": str(floats[0]).removeprefix("torch."),
        "int8": is_quantized(model),
        "slots": cache.slots,
        "max_len": cache.max_len,
        "cache": str(cache.keys.dtype).removeprefix("torch."),
        "constants": _signature(model),
    }


def _signature(model: KimbhoV1Model) -> list[list[Any]]:
    return [[n, str(t.dtype), list(t.shape)] for n, t in sorted(_constants(model).items())]


def package_name(spec: dict[str, Any]) -> str:
    """The package's file name: a hash of `spec` and of everything the compiled code depends on."""
    here = Path(__file__).resolve().parent
    sources = sorted((here.parent / "model").glob("*.py")) + [
        here / "decode_step.py",
        here / "small_matmul.py",
        here / "decode_package.py",
    ]
    digest = hashlib.sha256()
    for part in (
        json.dumps(spec, sort_keys=True),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        platform.machine(),
        f"{sys.version_info[0]}.{sys.version_info[1]}",
    ):
        digest.update(part.encode())
    for source in sources:
        digest.update(source.read_bytes())
    return f"decode-{digest.hexdigest()[:24]}"


class PackagedStep:
    """The compiled decode step of one engine on the CPU: `step(tokens, positions, keys, values)`
    -> logits, once `ready`. Built if missing: `wait=True` blocks until it is (compile=True),
    otherwise the build runs in the background and `ready` turns true when its package appears."""

    def __init__(self, model: KimbhoV1Model, cache: KVCache, wait: bool) -> None:
        self.spec = spec_of(model, cache)
        self.constants = _constants(model)
        directory = cache_dir()
        name = package_name(self.spec)
        self.path, self.failed = directory / f"{name}.pt2", directory / f"{name}.failed"
        self._runner: Any = None
        self._builder: subprocess.Popen[bytes] | None = None
        self._gave_up, self._reason = False, ""
        self._next_look = 0.0
        if self._load():
            return
        if not self.failed.exists():
            self._builder = _start_build(self.spec, directory, name)
        self._look()
        if wait and not self.wait():
            raise KimbhoError(
                f"compiling the decode step failed ({self._reason}); generate eager instead "
                f"(compile=False, or KIMBHO_COMPILE_DECODE=0)"
            )

    @property
    def ready(self) -> bool:
        if self._runner is None and not self._gave_up and time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + _LOOK_EVERY_S
            self._look()
        return self._runner is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the package is built and loaded (or `timeout` seconds pass, or the build
        fails); whether it is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._runner is None and not self._gave_up:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.1)
            self._look()
        return self._runner is not None

    def _look(self) -> None:
        """Load the package if it is there; give up if its build has ended without one."""
        # Whether the build had ended is read before looking for its package, which it writes
        # before it ends: an ended build and no package is a failed build, never a race.
        ended = (
            self._builder.poll() is not None
            if self._builder is not None
            else not self.path.with_suffix(".lock").exists()  # another process's build
        )
        if self._load() or self._gave_up:
            return
        log_file = self.path.with_suffix(".log")
        if self.failed.exists():
            self._give_up(f"{self.failed.read_text().strip()}; see {log_file}, delete {self.failed} to retry")
        elif ended:
            self._give_up(f"its build ended without a package; see {log_file}")

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        return self._runner(tokens, positions, keys, values)

    def _load(self) -> bool:
        if not self.path.exists():
            return False
        try:
            runner = torch._inductor.aoti_load_package(str(self.path))
            runner.load_constants(
                {n: self.constants[n] for n in runner.get_constant_fqns()},
                check_full_update=True,
                user_managed=True,  # the model's own tensors, not copies
            )
        except Exception as e:  # a damaged package: drop it, so the next process builds anew
            self.path.unlink(missing_ok=True)
            self._give_up(f"{self.path} could not be loaded ({type(e).__name__}: {e}); removed it")
            return False
        self._runner = runner
        if self._builder is not None:
            self._builder.poll()  # reap it
        return True

    def _give_up(self, reason: str) -> None:
        self._gave_up, self._reason = True, reason
        log.warning("decoding eager: the compiled decode step is not available (%s)", reason)


def _start_build(spec: dict[str, Any], directory: Path, name: str) -> subprocess.Popen[bytes] | None:
    """Start a builder for `spec` unless one is running; it writes directory/name.pt2."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / f"{name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _alive(lock):
            return None  # another process is building it
        lock.unlink(missing_ok=True)
        return _start_build(spec, directory, name)
    with os.fdopen(fd, "w") as f:
        spec_file = directory / f"{name}.json"
        spec_file.write_text(json.dumps(spec))
        with open(directory / f"{name}.log", "wb") as out:
            builder = subprocess.Popen(
                [sys.executable, "-m", "kimbho.inference.decode_package", str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # finishes even if this process is interrupted
            )
        f.write(str(builder.pid))
    log.info(
        "building the compiled decode step for this model's shape in the background (once per "
        "machine, about a minute); decoding eager until it is ready"
    )
    return builder


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
    """The builder process: rebuild the model shape of `spec_file` (zeros: the values are not
    compiled in), check it against the signature, export, compile, rename into place."""
    from ..config import KimbhoConfig
    from ..model.quantize import quantize_int8
    from .small_matmul import SmallMatmulPass

    spec = json.loads(spec_file.read_text())
    directory, name = spec_file.parent, spec_file.stem
    try:
        os.nice(10)  # the user's own decoding comes first
        config = KimbhoConfig.from_dict(spec["config"])
        with torch.device("meta"):
            model = KimbhoV1Model(config)
        model = model.to_empty(device="cpu")
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data.zero_()
        model.to(getattr(torch, spec["weights"]))
        if spec["int8"]:
            quantize_int8(model)
        if _signature(model) != spec["constants"]:
            raise RuntimeError("the rebuilt model's tensors differ from the engine's model")
        cache = model.new_cache(spec["slots"], spec["max_len"], dtype=getattr(torch, spec["cache"]))
        # Two tensors, not one twice: export would bind both arguments to the one input.
        tokens, positions = (torch.zeros(spec["slots"], dtype=torch.long) for _ in range(2))
        inputs = (tokens, positions, cache.keys, cache.values)
        with torch.no_grad():
            exported = torch.export.export(_Step(model.eval(), spec["max_len"]), inputs)
        partial = directory / f"{name}.partial.pt2"
        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(partial),
            inductor_configs={
                "post_grad_custom_post_pass": SmallMatmulPass(),
                "aot_inductor.package_constants_in_so": False,  # code only: weights bound at load
            },
        )
        os.replace(partial, directory / f"{name}.pt2")
        (directory / f"{name}.log").unlink(missing_ok=True)  # kept only to explain a failure
    except Exception as e:
        (directory / f"{name}.failed").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        (directory / f"{name}.lock").unlink(missing_ok=True)
        spec_file.unlink(missing_ok=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
