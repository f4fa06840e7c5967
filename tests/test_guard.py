"""The step guard: NaN/Inf (and optionally spiking) steps never reach the weights."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.config import TrainConfig
from kimbho.errors import KimbhoError
from kimbho.storage.checkpoints import list_checkpoints, verify
from kimbho.training.metrics import read_metrics
from kimbho.training.step_guard import SPIKE_WARMUP, StepGuard
from tests.conftest import tiny_run_config


def test_guard_refuses_non_finite_values() -> None:
    guard = StepGuard()
    assert guard.allows(3.0, 1.0) and guard.last_reason is None
    assert not guard.allows(math.nan, 1.0) and "non-finite loss" in guard.last_reason
    assert not guard.allows(3.0, math.inf) and "non-finite gradient norm" in guard.last_reason
    assert guard.consecutive == 2
    assert guard.allows(1e6, 1e6), "without skip_spikes, any finite step is applied"
    assert guard.consecutive == 0


def test_guard_skips_spikes_once_it_has_a_history() -> None:
    guard = StepGuard(spike_factor=3.0)
    for _ in range(SPIKE_WARMUP - 1):
        assert guard.allows(2.0, 1.0)
    assert guard.allows(100.0, 1.0), "too little history to call anything a spike"
    guard = StepGuard(spike_factor=3.0)
    for _ in range(SPIKE_WARMUP):
        guard.allows(2.0, 1.0)
    assert guard.allows(5.9, 2.9)
    assert not guard.allows(8.0, 1.0) and guard.last_reason.startswith("loss spike (8")
    assert not guard.allows(2.0, 4.0) and guard.last_reason.startswith("gradient norm spike")
    restored = StepGuard(spike_factor=3.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.consecutive == 2 and list(restored.recent) == list(guard.recent)


def test_spike_factor_must_exceed_one() -> None:
    with pytest.raises(KimbhoError, match="train.skip_spikes must be 0"):
        TrainConfig(skip_spikes=0.5)


class PoisonedForward:
    """Hooks the model's final norm so chosen steps produce NaN activations (multiplying by 1.0
    leaves every other step bit-for-bit unchanged)."""

    def __init__(self, trainer: kimbho.Trainer, steps: set[int]) -> None:
        self.trainer, self.steps = trainer, steps
        trainer.model.norm.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        poison = math.nan if self.trainer.progress.step in self.steps else 1.0
        return output * poison


def test_nan_step_leaves_weights_and_optimizer_untouched(data_dir: Path, tmp_path: Path) -> None:
    run = tiny_run_config(batch_size=4, seq_len=32, micro_batch_size=2)
    trainer = kimbho.Trainer(run, data_dir, tmp_path / "run", progress_bar=False)
    PoisonedForward(trainer, {2})
    for step in range(2):
        trainer.progress.step = step
        trainer.train_step(step)
    weights = copy.deepcopy(trainer.model.state_dict())
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    trainer.progress.step = 2
    loss, _ = trainer.train_step(2)
    assert math.isnan(loss) and "non-finite loss" in trainer.guard.last_reason
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    after = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in moments[i])
    assert all(p.grad is None for p in trainer.model.parameters()), "the poisoned gradients are dropped"


def test_infinite_gradient_norm_is_skipped(data_dir: Path, tmp_path: Path) -> None:
    trainer = kimbho.Trainer(
        tiny_run_config(batch_size=4, seq_len=32), data_dir, tmp_path / "run", progress_bar=False
    )
    weights = copy.deepcopy(trainer.model.state_dict())
    hook = trainer.model.head.weight.register_hook(lambda grad: grad * math.inf)
    loss, grad_norm = trainer.train_step(0)
    hook.remove()
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert not trainer.optimizer.state_dict()["state"], "Adam never stepped"


def test_skipped_steps_are_counted_and_the_run_goes_on(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = tiny_run_config(batch_size=4, seq_len=32, max_steps=8, log_every=4, eval_every=0, save_every=0)
    trainer = kimbho.Trainer(run, data_dir, out, progress_bar=False)
    PoisonedForward(trainer, {2, 3})
    applied: list[int] = []
    step_fn = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (applied.append(trainer.progress.step), step_fn(*a, **k))[1]  # type: ignore[method-assign]
    trainer.fit()
    assert applied == [0, 1, 4, 5, 6, 7], "the optimizer never steps on a NaN"
    assert [(r["step"], r["loss"]) for r in read_metrics(out, "skip")] == [(3, None), (4, None)]
    assert "non-finite loss" in read_metrics(out, "skip")[0]["reason"]
    train = read_metrics(out, "train")
    assert [r["skipped_steps"] for r in train] == [2, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_skips_in_a_row_stop_the_run(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = tiny_run_config(
        batch_size=4, seq_len=32, max_steps=20, save_every=2, eval_every=0, max_skipped_steps=3
    )
    trainer = kimbho.Trainer(run, data_dir, out, progress_bar=False)
    PoisonedForward(trainer, set(range(5, 20)))
    with pytest.raises(KimbhoError) as error:
        trainer.fit()
    message = str(error.value)
    assert "\n" not in message
    assert "the last 3 steps (up to step 8) were all skipped, the last for a non-finite loss" in message
    last_good = list_checkpoints(out)[-1]
    assert f"the last good checkpoint is {last_good}" in message
    assert last_good.name == "step-00000006"
    verify(last_good)
    model, _ = kimbho.load(last_good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
