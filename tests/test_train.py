import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kimbho
from kimbho.config import KimbhoConfig, TrainConfig
from kimbho.device import CPU_BF16_ENV
from kimbho.errors import KimbhoError
from kimbho.training.metrics import read_metrics
from kimbho.training.schedule import lr_at
from tests.conftest import tiny_run_config, without_wall_clock


@pytest.mark.precision
def test_loss_falls_and_run_directory_layout(trained_run: Path) -> None:
    train = read_metrics(trained_run, "train")
    assert train[0]["loss"] > train[-1]["loss"] + 1.0
    assert train[-1]["loss"] < math.log(512) - 1.5  # well below chance
    for field in ("loss", "lr", "tokens_seen", "tokens_per_sec", "mfu", "elapsed_sec"):
        assert field in train[0]
    assert 0 < train[-1]["mfu"]
    if os.environ.get(CPU_BF16_ENV) != "1":
        # A fraction of the measured peak (timing noise allowed). Not where bf16 is forced on a
        # CPU that emulates it: the peak is then timed on large emulated products, which run
        # slower than the tiny model's small ones.
        assert train[-1]["mfu"] < 1.5
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


@pytest.mark.precision
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_continues_and_matches_the_uninterrupted_run(
    optimizer: str, data_dir: Path, tmp_path: Path
) -> None:
    def config():  # dropout exercises the saved RNG state; validation and best saves come between steps
        run = tiny_run_config(
            max_steps=30, save_every=10, log_every=4, eval_every=10, micro_batch_size=4, optimizer=optimizer
        )
        run.model.dropout = 0.1
        return run

    full, part = tmp_path / "full", tmp_path / "part"
    kimbho.Trainer(config(), data_dir, full, progress_bar=False).fit()
    kimbho.Trainer(config(), data_dir, part, progress_bar=False).fit()
    # As after a crash just after step 10 was saved: only that checkpoint is left.
    for step in (20, 30):
        shutil.rmtree(part / "checkpoints" / f"step-{step:08d}")
    kimbho.Trainer(config(), data_dir, part, resume=True, progress_bar=False).fit()
    # One curve, record for record: the records the first process wrote after step 10 were
    # dropped on resume, and the record at step 12 averages steps 9-12 in both runs (the resumed
    # process read the losses of steps 9 and 10 back from the checkpoint).
    assert without_wall_clock(read_metrics(part)) == without_wall_clock(read_metrics(full))
    a = load_file(full / "checkpoints" / "step-00000030" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-00000030" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [
        torch.load(run / "checkpoints" / "step-00000030" / "trainer.pt", weights_only=True)["optimizer"]
        for run in (full, part)
    ]
    assert states[0]["state"].keys() == states[1]["state"].keys()
    for i, moments in states[0]["state"].items():
        assert all(torch.equal(value, states[1]["state"][i][key]) for key, value in moments.items())


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


# One batch in 4 micro-batches against the whole batch, 3 steps: how far the losses and the weight
# updates (all parameters' changes as one vector) may differ. In bf16 the products of 2 rows and of
# 8 round differently (8 bits of mantissa): measured on an AVX2 Zen 3 with bf16 forced, the losses
# agree to 2e-6 and the updates to 1.3% (a few elements of an early AdamW/Muon step flip sign, so
# elementwise tolerances would have to be as large as the update itself); fp32 agrees to 3e-6.
ACCUMULATION_TOLERANCE = {"fp32": dict(loss=1e-5, update=1e-4), "bf16": dict(loss=1e-4, update=0.05)}


@pytest.mark.precision
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_accumulation_matches_the_full_batch(precision: str, data_dir: Path, tmp_path: Path) -> None:
    tol = ACCUMULATION_TOLERANCE[precision]
    one = kimbho.Trainer(
        tiny_run_config(batch_size=8, precision=precision), data_dir, tmp_path / "one", progress_bar=False
    )
    four = kimbho.Trainer(
        tiny_run_config(batch_size=8, micro_batch_size=2, precision=precision),
        data_dir,
        tmp_path / "four",
        progress_bar=False,
    )
    assert four.accum_steps == 4
    initial = torch.cat([p.detach().flatten() for p in one.model.parameters()])
    for step in range(3):
        loss_one, _ = one.train_step(step)
        loss_four, _ = four.train_step(step)
        assert loss_one == pytest.approx(loss_four, rel=tol["loss"])
    update_one = torch.cat([p.detach().flatten() for p in one.model.parameters()]) - initial
    update_four = torch.cat([p.detach().flatten() for p in four.model.parameters()]) - initial
    assert (update_four - update_one).norm() / update_one.norm() < tol["update"]
    if precision == "fp32":
        torch.testing.assert_close(update_four, update_one, atol=1e-5, rtol=1e-4)


def test_precision_auto_follows_the_forced_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """KIMBHO_CPU_BF16 makes any CPU pick what a bf16-native (or an fp32-only) CPU picks, so the
    whole suite can run both branches of precision=auto on one machine."""
    from kimbho import device

    cpu = torch.device("cpu")
    monkeypatch.setenv(device.CPU_BF16_ENV, "1")
    assert device.pick_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setenv(device.CPU_BF16_ENV, "0")
    assert device.pick_precision("auto", cpu) == torch.float32
    monkeypatch.setenv(device.CPU_BF16_ENV, "yes")
    with pytest.raises(KimbhoError, match="KIMBHO_CPU_BF16='yes'"):
        device.pick_precision("auto", cpu)


def test_learning_rate_schedules() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(88, wsd) == 1.0 and lr_at(110, wsd) == pytest.approx(0.1)
    assert 0.1 < lr_at(99, wsd) < 1.0


def test_bf16_training_loss_within_two_percent_of_fp32(data_dir: Path, tmp_path: Path) -> None:
    """200 steps of the same run in fp32 and with bf16 autocast (fp32 master weights) end at the
    same loss. The model is minute: bf16 matrix products are emulated (slow) on CPUs without AMX."""
    final = {}
    for precision in ("fp32", "bf16"):
        run = tiny_run_config(
            precision=precision, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=10, max_steps=200
        )
        run.model = KimbhoConfig(
            vocab_size=512, emb_dim=32, num_heads=4, group_size=2, num_blocks=1, max_seq_len=32
        )
        trainer = kimbho.Trainer(run, data_dir, tmp_path / precision, progress_bar=False)
        assert trainer.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        losses = [trainer.train_step(step)[0] for step in range(200)]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        final[precision] = sum(losses[-20:]) / 20
    assert final["fp32"] < math.log(512) - 1.5  # it learned
    assert abs(final["bf16"] - final["fp32"]) < 0.02 * final["fp32"]


def test_precision_auto_picks_bf16_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from kimbho import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: False)
    assert device.pick_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: True)
    assert device.pick_precision("auto", cpu) == torch.bfloat16
    assert device.pick_precision("fp32", cpu) == torch.float32


def test_measuring_the_peak_leaves_the_global_rng_alone() -> None:
    """MFU's denominator is measured once per process; if that drew from the global RNG, dropout
    masks would depend on whether the process had measured yet, and resuming would not be exact."""
    from kimbho import device

    device._measured_peak.cache_clear()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert device.peak_flops(torch.device("cpu"), torch.float32) > 1e9
    assert torch.equal(torch.get_rng_state(), before)


def test_compile_auto_compiles_long_cpu_runs_and_checkpoints_stay_bare(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed peak (100 GFLOP/s): measured, it is ~6x higher on an AMX CPU in bf16, where this
    # 1000-step run would take under the 3 minutes that make compiling pay.
    monkeypatch.setattr("kimbho.training.trainer.peak_flops", lambda device, dtype: 1e11)
    short = kimbho.Trainer(tiny_run_config(), data_dir, tmp_path / "short", progress_bar=False)
    assert not short.compiled  # 40 tiny steps: compiling would cost more than it saves
    run = tiny_run_config(batch_size=16, seq_len=256, max_steps=1000)
    run.model = KimbhoConfig.from_preset("small")  # a 15M-parameter model for 1000 steps: it pays
    long = kimbho.Trainer(run, data_dir, tmp_path / "long", progress_bar=False)
    assert long.compiled and long.model._compiled_call_impl is not None  # compiled lazily, at a step
    weights = load_file(long.save() / "model.safetensors")
    assert "blocks.0.attn.qkv.weight" in weights
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)


@pytest.mark.slow
def test_compiled_training_matches_eager(data_dir: Path, tmp_path: Path) -> None:
    """`train.compile=true` (torch.compile + Inductor) trains to the same losses as eager."""
    losses = {}
    for mode in ("false", "true"):
        trainer = kimbho.Trainer(
            tiny_run_config(compile=mode, max_steps=10), data_dir, tmp_path / mode, progress_bar=False
        )
        losses[mode] = [trainer.train_step(step)[0] for step in range(10)]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
