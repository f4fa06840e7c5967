import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kimbho
from kimbho.config import KimbhoConfig, TrainConfig
from kimbho.errors import KimbhoError
from kimbho.metrics import read_metrics
from kimbho.train import lr_at

from .conftest import tiny_run_config


def test_loss_falls_and_run_directory_layout(trained_run: Path) -> None:
    train = read_metrics(trained_run, "train")
    assert train[0]["loss"] > train[-1]["loss"] + 1.0
    assert train[-1]["loss"] < math.log(512) - 1.5  # well below chance
    for field in ("loss", "lr", "tokens_seen", "tokens_per_sec", "elapsed_sec"):
        assert field in train[0]
    assert train[0]["tokens_seen"] == 5 * 8 * 64
    evals = read_metrics(trained_run, "eval")
    assert [e["step"] for e in evals] == [60, 120]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert 0 < evals[-1]["val_bpb"] < 4
    assert read_metrics(trained_run, "sample")
    assert (trained_run / "config.yaml").is_file() and (trained_run / "tokenizer.json").is_file()
    assert any((trained_run / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert ckpts == ["best", "step-00000060", "step-00000120"]


def test_checkpoint_contents_are_safe_to_load(trained_run: Path) -> None:
    ckpt = trained_run / "checkpoints" / "step-00000120"
    weights = load_file(ckpt / "model.safetensors")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    assert "blocks.0.attn.qkv.weight" in weights
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["progress"]["step"] == 120
    assert json.loads((ckpt / "config.json").read_text())["format"] == "kimbho"
    model, tok = kimbho.load(trained_run)
    assert torch.equal(model.head.weight, weights["head.weight"])


def test_resume_continues_and_matches_the_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    def config():  # dropout exercises the saved RNG state; validation and best saves come between steps
        run = tiny_run_config(max_steps=30, save_every=10, log_every=1, eval_every=10, micro_batch_size=4)
        run.model.dropout = 0.1
        return run

    full, part = tmp_path / "full", tmp_path / "part"
    kimbho.Trainer(config(), data_dir, full, progress_bar=False).fit()
    kimbho.Trainer(config(), data_dir, part, progress_bar=False).fit()
    # As after a crash just after step 10 was saved: only that checkpoint is left.
    for step in (20, 30):
        shutil.rmtree(part / "checkpoints" / f"step-{step:08d}")
    kimbho.Trainer(config(), data_dir, part, resume=True, progress_bar=False).fit()
    # One curve: the records the first process wrote after step 10 were dropped on resume.
    losses = [(r["step"], r["loss"]) for r in read_metrics(full, "train")]
    assert [(r["step"], r["loss"]) for r in read_metrics(part, "train")] == losses
    a = load_file(full / "checkpoints" / "step-00000030" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-00000030" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume(trained_run: Path, data_dir: Path) -> None:
    with pytest.raises(KimbhoError, match="pass --resume"):
        kimbho.Trainer(tiny_run_config(), data_dir, trained_run, progress_bar=False)


def test_vocab_follows_tokenizer_unless_set(data_dir: Path, tmp_path: Path) -> None:
    run = tiny_run_config(seq_len=32)
    run.model = KimbhoConfig.from_preset("seed")  # vocab 1000 in the preset, 512 in the data
    trainer = kimbho.Trainer(run, data_dir, tmp_path / "a", progress_bar=False)
    assert trainer.model.config.vocab_size == 512
    run = tiny_run_config(seq_len=32)
    run.model = KimbhoConfig.from_preset("seed")
    with pytest.raises(KimbhoError, match="tokenizer has 512 tokens but the model was built for 1000"):
        kimbho.Trainer(run, data_dir, tmp_path / "b", explicit_keys={"model.vocab_size"})
    assert not (tmp_path / "b").exists()


def test_seq_len_above_context_is_refused(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KimbhoError, match="train.seq_len=128 is longer than model.max_seq_len=64"):
        kimbho.Trainer(tiny_run_config(seq_len=128), data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gradient_accumulation_matches_the_full_batch(data_dir: Path, tmp_path: Path) -> None:
    one = kimbho.Trainer(tiny_run_config(batch_size=8), data_dir, tmp_path / "one", progress_bar=False)
    four = kimbho.Trainer(
        tiny_run_config(batch_size=8, micro_batch_size=2), data_dir, tmp_path / "four", progress_bar=False
    )
    assert four.accum_steps == 4
    for step in range(3):
        loss_one, _ = one.train_step(step)
        loss_four, _ = four.train_step(step)
        assert loss_one == pytest.approx(loss_four, rel=1e-5)
    for a, b in zip(one.model.parameters(), four.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_learning_rate_schedules() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(88, wsd) == 1.0 and lr_at(110, wsd) == pytest.approx(0.1)
    assert 0.1 < lr_at(99, wsd) < 1.0
