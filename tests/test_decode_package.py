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
from kimbho.inference.decode_package import CACHE_DIR_ENV, package_name, spec_of
from kimbho.inference.engine import Engine, Request

PROMPTS = [[12, 45, 67], list(range(100, 120))]


def _tokens(engine: Engine) -> list[list[int]]:
    """Each prompt and its 20 greedy tokens (ids count up across an engine's runs)."""
    new: dict[int, list[int]] = {}
    for event in engine.run([Request(p, 20) for p in PROMPTS]):
        new.setdefault(event.request_id, []).append(event.token)
    return [[*p, *new[i]] for p, i in zip(PROMPTS, sorted(new), strict=True)]


def _package(model: kimbho.KimbhoV1Model, slots: int, max_len: int, root: Path) -> Path:
    return root / "decode" / f"{package_name(spec_of(model, model.new_cache(slots, max_len)))}.pt2"


@pytest.fixture(autouse=True)
def _compile_by_default(monkeypatch) -> None:
    """Undo the suite's KIMBHO_COMPILE_DECODE=0: here the CPU's default is under test."""
    monkeypatch.delenv(COMPILE_DECODE_ENV, raising=False)


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
    assert engine.compiled_step is not None and not engine.compiled_step.ready
    assert _tokens(engine) == eager  # while it builds
    assert engine.compiled_step.wait(timeout=600)
    assert _tokens(engine) == eager  # compiled
    built = [p.name for p in (tmp_path / "decode").iterdir()]
    assert built == [_package(model, 2, 48, tmp_path).name]  # no lock, log or partial file left
    # Another model of the same shape binds its own weights to the same package, at once.
    torch.manual_seed(1)
    other = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny")).eval()
    second = Engine(other, slots=2, max_len=48)
    assert second.compiled_step is not None and second.compiled_step.ready
    assert _tokens(second) == kimbho.generate_batch(other, PROMPTS, 20, compile=False) != eager
    assert [p.name for p in (tmp_path / "decode").iterdir()] == built  # nothing rebuilt


def test_a_damaged_package_is_removed_and_the_engine_decodes_eager(
    tiny_model, tmp_path: Path, monkeypatch, kimbho_log: list[str]
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    package = _package(tiny_model, 2, 48, tmp_path)
    package.parent.mkdir(parents=True)
    package.write_bytes(b"not a package")
    (package.with_suffix(".lock")).write_text("1")  # pid 1 is alive: no build is started
    engine = Engine(tiny_model, slots=2, max_len=48)
    assert not engine.compiled_step.ready  # type: ignore[union-attr]
    assert not package.exists()
    assert [m for m in kimbho_log if "could not be loaded" in m and "decoding eager" in m]
    assert _tokens(engine) == kimbho.generate_batch(tiny_model, PROMPTS, 20, compile=False)


def test_a_failed_build_is_reported_once_not_retried(
    tiny_model, tmp_path: Path, monkeypatch, kimbho_log: list[str]
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    package = _package(tiny_model, 2, 48, tmp_path)
    package.parent.mkdir(parents=True)
    package.with_suffix(".failed").write_text("CppCompileError: no C++ compiler")
    engine = Engine(tiny_model, slots=2, max_len=48)
    assert not engine.compiled_step.ready  # type: ignore[union-attr]
    assert [m for m in kimbho_log if "no C++ compiler" in m and "to retry" in m]
    assert _tokens(engine) == kimbho.generate_batch(tiny_model, PROMPTS, 20, compile=False)
    assert not package.with_suffix(".lock").exists()  # no builder was started
    with pytest.raises(kimbho.KimbhoError, match="compiling the decode step failed .*no C\\+\\+ compiler"):
        Engine(tiny_model, slots=2, max_len=48, compile=True)
