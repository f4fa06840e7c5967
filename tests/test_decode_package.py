"""The CPU's compiled decode step: built ahead of time by a background process, once per machine
and model shape, loaded by every later engine; eager meanwhile, and eager (with one warning) when
a package is damaged or its build failed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.config import KimbhoConfig
from kimbho.device import COMPILE_DECODE_ENV, compile_decode
from kimbho.inference import cpu_kernels, decode_package
from kimbho.inference.decode_package import CACHE_DIR_ENV, package_name, spec_of
from kimbho.inference.engine import Engine, Request

PROMPTS = [[12, 45, 67], list(range(100, 120))]


def _tokens(engine: Engine) -> list[list[int]]:
    """Each prompt and its 20 greedy tokens (ids count up across an engine's runs)."""
    new: dict[int, list[int]] = {}
    for event in engine.run([Request(p, 20) for p in PROMPTS]):
        new.setdefault(event.request_id, []).append(event.token)
    return [[*p, *new[i]] for p, i in zip(PROMPTS, sorted(new), strict=True)]


def _package(model: kimbho.KimbhoV1Model, slots: int, rows: int, root: Path) -> Path:
    """The package of `model`'s step over `rows` of `slots` slots of 48 positions."""
    return root / "decode" / f"{package_name(spec_of(model, model.new_cache(slots, 48), rows))}.pt2"


@pytest.fixture(autouse=True)
def _compile_by_default(monkeypatch) -> None:
    """Undo the suite's KIMBHO_COMPILE_DECODE=0: here the CPU's default is under test. And each
    test sees the warnings a process gives once."""
    monkeypatch.delenv(COMPILE_DECODE_ENV, raising=False)
    monkeypatch.setattr(decode_package, "_WARNED", set())


def test_the_cpu_default_is_the_compiled_step_built_in_the_background(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert compile_decode(None, cpu) is None  # eager until built in the background
    monkeypatch.setenv(COMPILE_DECODE_ENV, "0")
    assert compile_decode(None, cpu) is False
    monkeypatch.setenv(COMPILE_DECODE_ENV, "1")
    assert compile_decode(None, cpu) is True
    assert compile_decode(False, cpu) is False
    monkeypatch.setenv(COMPILE_DECODE_ENV, "yes")
    with pytest.raises(kimbho.KimbhoError, match="KIMBHO_COMPILE_DECODE='yes'"):
        compile_decode(None, cpu)


@pytest.mark.slow
def test_engines_decode_eager_until_the_package_is_built_then_share_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny")).eval()
    eager = kimbho.generate_batch(model, PROMPTS, 20, compile=False)
    engine = Engine(model, slots=2, max_len=48)
    assert engine.compiled is not None and not engine.compiled.ready
    assert _tokens(engine) == eager  # while it builds
    assert engine.compiled.wait(timeout=600)
    # A bucket of slots, over the positions filled so far (at least 2), up to the cache's last.
    assert [engine.compiled.step_for(r, n)[:2] for r, n in [(1, 30), (2, 1)]] == [(1, 30), (2, 2)]  # type: ignore[index]
    assert engine.compiled.step_for(1, 48) is None  # the very last position: eager
    assert _tokens(engine) == eager  # compiled: both prompts, then the longer one alone
    # To the end of the cache: every length a package takes, then the last position eager.
    full = [Request(p, 48 - len(p)) for p in PROMPTS]
    assert [e.token for e in engine.run(full)] == [
        e.token for e in Engine(model, slots=2, max_len=48, compile=False).run(full)
    ]
    built = sorted(p.name for p in (tmp_path / "decode").iterdir())
    # A package per bucket of slots, the kernels they call, and no lock, log, spec or partial file left.
    packages = [_package(model, 2, rows, tmp_path).name for rows in (1, 2)]
    assert built == sorted([*packages, cpu_kernels.library_path(tmp_path / "decode").name])
    # Another model of the same shape binds its own weights to the same package, at once.
    torch.manual_seed(1)
    other = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny")).eval()
    second = Engine(other, slots=2, max_len=48)
    assert second.compiled is not None and second.compiled.ready
    assert _tokens(second) == kimbho.generate_batch(other, PROMPTS, 20, compile=False) != eager
    assert sorted(p.name for p in (tmp_path / "decode").iterdir()) == built  # nothing rebuilt


@pytest.fixture
def one_slot_package(tiny_model, tmp_path: Path, monkeypatch) -> Path:
    """Where the package of `tiny_model`'s one-slot engine goes, in an empty cache."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    package = _package(tiny_model, 1, 1, tmp_path)
    package.parent.mkdir(parents=True)
    return package


def test_a_damaged_package_is_removed_and_the_engine_decodes_eager(
    tiny_model, one_slot_package: Path, kimbho_log: list[str]
) -> None:
    package = one_slot_package
    package.write_bytes(b"not a package")
    (package.with_suffix(".lock")).write_text("1")  # pid 1 is alive: no build is started
    engine = Engine(tiny_model, slots=1, max_len=48)
    assert not engine.compiled.ready  # type: ignore[union-attr]
    assert not package.exists()
    assert [m for m in kimbho_log if "could not be loaded" in m and "decoding eager" in m]
    assert _tokens(engine) == kimbho.generate_batch(tiny_model, PROMPTS, 20, compile=False)


def test_a_failed_build_is_reported_once_not_retried(
    tiny_model, one_slot_package: Path, kimbho_log: list[str]
) -> None:
    package = one_slot_package
    package.with_suffix(".failed").write_text("CppCompileError: no C++ compiler")
    engine = Engine(tiny_model, slots=1, max_len=48)
    assert not engine.compiled.ready  # type: ignore[union-attr]
    assert [m for m in kimbho_log if "no C++ compiler" in m and "to retry" in m]
    assert _tokens(engine) == kimbho.generate_batch(tiny_model, PROMPTS, 20, compile=False)
    assert not package.with_suffix(".lock").exists()  # no builder was started
    with pytest.raises(kimbho.KimbhoError, match="compiling the decode step failed .*no C\\+\\+ compiler"):
        Engine(tiny_model, slots=1, max_len=48, compile=True)
