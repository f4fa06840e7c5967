"""`--device` and `--dtype` on every inference command (generate, eval, serve, export), and
`kimbho.load(MODEL, device=..., dtype=...)` under them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.device import CPU_BF16_ENV
from tests.conftest import run_cli


def test_load_converts_the_weights_and_keeps_the_rotary_tables(trained_run: Path) -> None:
    fp32, _ = kimbho.load(trained_run)
    bf16, _ = kimbho.load(trained_run, device="cpu", dtype="bf16")
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.rope_cos.dtype == torch.float32  # positions stay exact
    assert bf16.embed.weight.device.type == "cpu"
    ids = torch.tensor([[5, 6, 7, 8]])
    out = kimbho.generate(bf16, ids, 8)  # the engine's cache follows the weights' dtype
    assert out.shape == (1, 12)
    with pytest.raises(kimbho.KimbhoError, match="unknown dtype 'fp8'"):
        kimbho.load(trained_run, dtype="fp8")


def test_eval_in_bf16_is_close_to_fp32(trained_run: Path, data_dir: Path, capsys) -> None:
    results = {}
    for dtype in ("fp32", "bf16"):
        assert run_cli("eval", trained_run, "--data", data_dir, "--device", "cpu", "--dtype", dtype) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert results["bf16"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=0.02)
    assert results["bf16"]["loss"] != results["fp32"]["loss"]  # it did run in bf16


def test_generate_and_serve_take_device_and_dtype(trained_run: Path, capsys) -> None:
    args = ["--prompt", "The", "--max-new-tokens", 6, "--temperature", 0]
    assert run_cli("generate", trained_run, *args, "--device", "auto", "--dtype", "bf16") == 0
    assert capsys.readouterr().out.startswith("The")
    from kimbho.serve import build_app

    app = build_app(trained_run, device="cpu", dtype="bf16", slots=1)
    try:
        assert app.state.worker.engine.model.head.weight.dtype == torch.bfloat16
        assert app.state.worker.engine.cache.keys.dtype == torch.bfloat16
    finally:
        app.state.worker.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "PyTorch sees no CUDA GPU"), ("tpu7", "unknown device 'tpu7'")],
)
def test_an_unavailable_device_is_one_line(trained_run: Path, device: str, message: str, capsys) -> None:
    for command in (["generate", trained_run, "--prompt", "x"], ["eval", trained_run, "--data", trained_run]):
        assert run_cli(*command, "--device", device) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_auto_keeps_a_bf16_checkpoint_where_bf16_is_native(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HF directory stored in bf16 loads in bf16 under --dtype auto on a bf16-native CPU, and
    in fp32 on one that would emulate bf16; `export hf --dtype bf16` writes it."""
    out = tmp_path / "hf"
    assert run_cli("export", "hf", trained_run, out, "--dtype", "bf16") == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert kimbho.load(out, dtype="auto")[0].head.weight.dtype == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert kimbho.load(out, dtype="auto")[0].head.weight.dtype == torch.float32
    assert kimbho.load(trained_run, dtype="auto")[0].head.weight.dtype == torch.float32  # stored fp32
