"""`--device` and `--dtype` on every inference command (generate, eval, serve, export), and
`kimbho.load(MODEL, device=..., dtype=...)` under them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.device import CPU_BF16_ENV
from kimbho.inference.engine import Engine, Request
from kimbho.model.quantize import Int8Linear, quantize_int8
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
    assert run_cli("generate", trained_run, *args, "--dtype", "int8") == 0
    assert capsys.readouterr().out.startswith("The")
    app = build_app(trained_run, device="cpu", dtype="int8", slots=1)
    try:
        assert isinstance(app.state.worker.engine.model.head, Int8Linear)
        assert app.state.worker.engine.cache.keys.dtype == torch.float32  # activations stay fp32
    finally:
        app.state.worker.stop()


def test_int8_rounds_each_weight_to_its_rows_scale() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0  # a zero row must not divide by zero
        linear.weight[5] *= 100  # one row's range must not coarsen the others'
    q = Int8Linear.from_linear(linear)
    assert q.qweight.shape == (48, 64) and q.qweight.dtype == torch.int8 and q.scales.shape == (48,)
    assert q.qweight.abs().max() == 127
    error = (q.weight - linear.weight).abs()
    assert (error <= q.scales[:, None] / 2 + 1e-7).all()  # round to nearest, per row
    assert torch.equal(q.weight[3], torch.zeros(64))
    assert error[[0, 1, 2, 4]].max() < error[5].max() / 50
    x = torch.randn(7, 64)
    torch.testing.assert_close(q(x), x @ q.weight.T, rtol=1e-5, atol=1e-5)
    q.to(torch.bfloat16)  # integers keep their dtype
    torch.testing.assert_close(q.weight.float(), Int8Linear.from_linear(linear).weight, rtol=1e-2, atol=0)


def test_int8_load_quantizes_every_projection_and_evaluates_close_to_fp32(
    trained_run: Path, data_dir: Path, capsys
) -> None:
    model, _ = kimbho.load(trained_run, dtype="int8")
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    assert len(linears) == 4 * model.config.num_blocks + 1  # qkv, out, gate_up, down; the head
    assert model.embed.weight.dtype == torch.float32
    results = {}
    for dtype in ("fp32", "int8"):
        assert run_cli("eval", trained_run, "--data", data_dir, "--dtype", dtype) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert results["int8"]["bits_per_byte"] == pytest.approx(results["fp32"]["bits_per_byte"], rel=0.01)
    assert results["int8"]["loss"] != results["fp32"]["loss"]  # it did run quantized


def test_a_written_file_takes_no_int8(trained_run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli("export", "hf", trained_run, tmp_path / "hf", "--dtype", "int8")
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_the_compiled_step_reads_int8_weights_and_picks_eagers_tokens(tiny_model) -> None:
    quantize_int8(tiny_model)
    prompts = [[12, 45, 67], list(range(100, 120))]
    eager = kimbho.generate_batch(tiny_model, prompts, 20, compile=False)
    engine = Engine(tiny_model, slots=1, max_len=48, compile=True)
    rows = [list(p) for p in prompts]
    for event in engine.run([Request(p, 20) for p in prompts]):
        rows[event.request_id].append(event.token)
    assert rows == eager


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
