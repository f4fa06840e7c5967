"""The CUDA path: inference commands on the GPU, one compiled decode graph for every prompt
length and batch size, and bf16 training. Runs only where PyTorch sees a CUDA GPU (the `cuda`
marker; conftest skips it elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.device import compile_decode
from tests.conftest import run_cli, tiny_run_config

pytestmark = pytest.mark.cuda


def test_inference_commands_run_on_the_gpu(trained_run: Path, data_dir: Path, capsys) -> None:
    model, _ = kimbho.load(trained_run, device="auto")
    assert model.embed.weight.device.type == "cuda"
    assert run_cli("eval", trained_run, "--data", data_dir, "--dtype", "bf16") == 0
    on_gpu = json.loads(capsys.readouterr().out)
    assert run_cli("eval", trained_run, "--data", data_dir, "--device", "cpu") == 0
    on_cpu = json.loads(capsys.readouterr().out)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=0.02)


def test_one_compiled_graph_serves_every_prompt_length(trained_run: Path) -> None:
    """compile=None compiles on CUDA, with the whole context as the slot length and a
    power-of-two slot count, so new prompt lengths and batch sizes reuse the graphs (past 8 a
    fullgraph compile would be an error)."""
    model, _ = kimbho.load(trained_run, device="cuda")
    assert compile_decode(None, model.embed.weight.device)
    prompts = [list(range(5, 5 + n)) for n in range(1, 12)]
    for count in (1, 2, 3, 5, 11):
        rows = kimbho.generate_batch(model, prompts[:count], 8)
        eager = kimbho.generate_batch(model, prompts[:count], 8, compile=False)
        assert rows == eager


def test_bf16_training_on_the_gpu(data_dir: Path, tmp_path: Path) -> None:
    run = tiny_run_config(max_steps=30, eval_every=30, save_every=30)
    trainer = kimbho.Trainer(run, data_dir, tmp_path / "run", progress_bar=False)
    assert trainer.device.type == "cuda" and trainer.dtype == torch.bfloat16
    last = trainer.fit()
    assert last["train"]["loss"] < 6.0  # below chance (ln 512 = 6.24)
    model, _ = kimbho.load(tmp_path / "run", device="cuda")
    assert model.embed.weight.dtype == torch.float32  # checkpoints keep fp32 weights
