import io
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.config import KimbhoConfig, TrainConfig
from kimbho.training.metrics import read_metrics
from kimbho.training.optim import Muon, MuonWithAdamW, build_optimizer, orthogonalize
from tests.conftest import tiny_run_config


@pytest.mark.parametrize("shape", [(3, 16, 40), (2, 40, 16), (1, 24, 24)])
def test_newton_schulz_orthogonalizes(shape: tuple[int, int, int]) -> None:
    """Every singular value lands near one (Jordan's quintic puts them in about [0.7, 1.2])."""
    torch.manual_seed(0)
    # Columns scaled over a decade: condition numbers from ~9 to ~200. (Five quintic steps lift a
    # singular value by at most ~3.4^5, so far smaller ones, relative to the norm, stay small.)
    matrices = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])
    ortho = orthogonalize(matrices, steps=5, dtype=torch.float32)
    assert ortho.shape == matrices.shape
    singular = torch.linalg.svdvals(ortho)
    assert singular.min() > 0.5 and singular.max() < 1.3
    # Same singular vectors: the orthogonalised matrix points where the input does.
    assert torch.all((ortho * matrices).sum(dim=(-2, -1)) > 0)


def test_muon_takes_hidden_matrices_and_adamw_the_rest() -> None:
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny"))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert in_muon == hidden and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}
    assert id(model.embed.weight) in in_adamw and id(model.head.weight) in in_adamw
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
    with pytest.raises(ValueError, match="2-D"):
        Muon([model.norm.weight])


def test_adamw_is_fused_on_cpu_and_decays_matrices_only() -> None:
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny"))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    for group in opt.param_groups:
        assert all(p.dim() >= 2 for p in group["params"]) == (group["weight_decay"] == 0.1)


def test_muon_trains_and_its_state_survives_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    run = tiny_run_config(optimizer="muon", lr=3e-3, max_steps=40, eval_every=0, save_every=40)
    trainer = kimbho.Trainer(run, data_dir, tmp_path / "run", progress_bar=False)
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run", "train")]
    assert losses[-1] < losses[0] - 1.0
    # The combined state holds both optimizers' moments and loads with weights_only.
    buffer = io.BytesIO()
    torch.save(trainer.optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # One optimizer's layout: every parameter has state, Muon's (numbered first) a momentum buffer.
    assert len(state["state"]) == len(list(trainer.model.parameters()))
    n_muon = len(trainer.optimizer.muon.state)
    assert {i for i, s in state["state"].items() if "momentum_buffer" in s} == set(range(n_muon))
    resumed = kimbho.Trainer(
        tiny_run_config(optimizer="muon", lr=3e-3, max_steps=41, eval_every=0, save_every=41),
        data_dir,
        tmp_path / "run",
        resume=True,
        progress_bar=False,
    )
    assert resumed.progress.step == 40
    for a, b in zip(
        resumed.optimizer.muon.state.values(), trainer.optimizer.muon.state.values(), strict=True
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
