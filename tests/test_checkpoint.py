"""Checkpoints: complete state, integrity, fallback, refusals, safe loading, retention, failed saves."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kimbho
from kimbho.errors import KimbhoError
from kimbho.storage.checkpoints import CorruptCheckpoint, list_checkpoints, load_trainer_state, verify
from kimbho.training.metrics import read_metrics
from tests.conftest import run_cli, tiny_run_config

LAST = "checkpoints/step-00000120"


def trained_run_config() -> kimbho.RunConfig:
    """The config `trained_run` was made with."""
    return tiny_run_config(max_steps=120, eval_every=60, save_every=60)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- what a checkpoint holds ------------------------------------------------------------------


def test_checkpoint_holds_the_complete_training_state(
    trained_run: Path, data_dir: Path, tokenizer: kimbho.Tokenizer
) -> None:
    ckpt = trained_run / LAST
    manifest = verify(ckpt)
    assert set(manifest["files"]) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "run.yaml",
        "trainer.pt",
    }
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["progress"]["step"] == 120 and state["progress"]["tokens_seen"] == 120 * 8 * 64
    assert state["data"] == {"next_step": 120, "seed": 0, "batch_size": 8, "seq_len": 64}
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert len(state["optimizer"]["state"]) == len(list(kimbho.load(ckpt)[0].parameters()))
    assert state["fingerprint"]["tokenizer_sha256"] == tokenizer.sha256
    splits = json.loads((data_dir / "meta.json").read_text())["splits"]
    for split in ("train", "val"):
        want = {"tokens": splits[split]["tokens"], "sha256": splits[split]["sha256"]}
        assert state["fingerprint"]["dataset"][split] == want
    assert yaml.safe_load((ckpt / "run.yaml").read_text())["train"]["max_steps"] == 120


def test_best_checkpoint_is_kept_aside(trained_run: Path) -> None:
    lowest = min(read_metrics(trained_run, "eval"), key=lambda r: r["val_loss"])
    best = trained_run / "checkpoints" / "best"
    manifest = verify(best)
    assert "trainer.pt" not in manifest["files"]  # weights for use, not for resuming
    assert manifest["step"] == lowest["step"] and manifest["val_loss"] == lowest["val_loss"]
    model, _ = kimbho.load(best)
    same_step = load_file(trained_run / "checkpoints" / f"step-{lowest['step']:08d}" / "model.safetensors")
    assert all(torch.equal(p, same_step[name]) for name, p in model.state_dict().items())


def test_retention_keeps_the_newest_and_the_best(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = tiny_run_config(batch_size=4, seq_len=32, max_steps=8, save_every=2, keep_last=2, eval_every=2)
    kimbho.Trainer(run, data_dir, out, progress_bar=False).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best",
        "step-00000006",
        "step-00000008",
    ]
    lowest = min(read_metrics(out, "eval"), key=lambda r: r["val_loss"])
    assert verify(out / "checkpoints" / "best")["val_loss"] == lowest["val_loss"]


def test_stale_temporaries_are_removed_on_start(
    run_copy: Path, data_dir: Path, kimbho_log: list[str]
) -> None:
    half_written = run_copy / "checkpoints" / ".tmp-step-00000180-4242"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0" * 100)
    half_deleted = run_copy / "checkpoints" / ".tmp-old-step-00000060-4242"
    shutil.copytree(run_copy / LAST, half_deleted)
    kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)
    assert not half_written.exists() and not half_deleted.exists()
    assert any("removing incomplete checkpoint" in m and str(half_written) in m for m in kimbho_log)


# --- integrity ----------------------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "byte-flipped": lambda data: (
        data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
    ),
}
FILES = ["model.safetensors", "config.json", "tokenizer.json", "run.yaml", "trainer.pt", "manifest.json"]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_named_in_one_line(run_copy: Path, name: str, damage: str) -> None:
    ckpt = run_copy / LAST
    path = ckpt / name
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CorruptCheckpoint) as error:
        verify(ckpt)
    assert str(path) in one_line(error)
    with pytest.raises(KimbhoError) as error:
        kimbho.load(ckpt)
    assert str(path) in one_line(error)


def test_checkpoint_without_a_manifest_is_refused(run_copy: Path) -> None:
    """The manifest is written last: a checkpoint without one may be half-written, so it is not
    loaded unverified. A damaged trainer.pt is named too."""
    ckpt = run_copy / LAST
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpoint) as error:
        kimbho.load(ckpt)
    assert str(ckpt / "manifest.json") in one_line(error) and "incomplete" in one_line(error)
    (ckpt / "trainer.pt").write_bytes(b"PK\3\4 cut short")
    with pytest.raises(CorruptCheckpoint) as error:
        load_trainer_state(ckpt)
    assert str(ckpt / "trainer.pt") in one_line(error)


def test_cli_reports_a_corrupt_checkpoint_in_one_line(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = run_copy / LAST / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run_cli("generate", run_copy, "--prompt", "x", "--max-new-tokens", "2") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kimbho: error: ") and str(weights) in err


def test_resume_falls_back_past_a_corrupt_checkpoint(
    run_copy: Path, data_dir: Path, kimbho_log: list[str]
) -> None:
    bad = run_copy / LAST / "trainer.pt"
    bad.write_bytes(bad.read_bytes()[:5000])
    trainer = kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)
    assert trainer.progress.step == 60
    step_60 = load_file(run_copy / "checkpoints" / "step-00000060" / "model.safetensors")
    assert all(torch.equal(p, step_60[name]) for name, p in trainer.model.state_dict().items())
    warning = next(m for m in kimbho_log if "falling back" in m)
    assert str(bad) in warning and "\n" not in warning
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-00000060"]
    assert (run_copy / "checkpoints" / "unusable-step-00000120" / "trainer.pt").is_file()  # kept to inspect


def test_resume_with_no_usable_checkpoint_is_refused(run_copy: Path, data_dir: Path) -> None:
    for ckpt in list_checkpoints(run_copy):
        (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(KimbhoError, match="no usable checkpoint"):
        kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)


# --- resuming with other settings -----------------------------------------------------------------


def test_resume_refuses_another_model_config(run_copy: Path, data_dir: Path) -> None:
    config_yaml = (run_copy / "config.yaml").read_bytes()
    run = trained_run_config()
    run.model.num_blocks = 3
    with pytest.raises(KimbhoError) as error:
        kimbho.Trainer(run, data_dir, run_copy, resume=True, progress_bar=False)
    message = one_line(error)
    assert "model.num_blocks is 2 in the checkpoint but 3 now" in message and "--force-resume" in message
    # The original settings are in the checkpoint's run.yaml (config.yaml follows the config in use).
    assert f"see {run_copy / LAST / 'run.yaml'}" in message
    assert (run_copy / "config.yaml").read_bytes() == config_yaml


def test_resume_says_an_edited_config_yaml_is_not_read(
    run_copy: Path, data_dir: Path, kimbho_log: list[str]
) -> None:
    config_yaml = run_copy / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("lr: 0.003", "lr: 0.0001"))
    kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)
    assert any(
        f"{config_yaml} differs from this run's config, and training does not read it" in m
        for m in kimbho_log
    )
    assert "lr: 0.0001" not in config_yaml.read_text()  # it records the config in use again
    kimbho_log.clear()
    kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)
    assert not any("differs from this run's config" in m for m in kimbho_log)  # unedited: quiet


def test_force_resume_overrides_the_refusal(run_copy: Path, data_dir: Path, kimbho_log: list[str]) -> None:
    run = trained_run_config()
    run.model.dropout = 0.1
    with pytest.raises(KimbhoError, match="model.dropout is 0.0 in the checkpoint but 0.1 now"):
        kimbho.Trainer(run, data_dir, run_copy, resume=True, progress_bar=False)
    trainer = kimbho.Trainer(run, data_dir, run_copy, force_resume=True, progress_bar=False)
    assert trainer.progress.step == 120
    assert any(m.startswith("--force-resume") and "model.dropout" in m for m in kimbho_log)


def test_resume_refuses_another_optimizer(run_copy: Path, data_dir: Path, kimbho_log: list[str]) -> None:
    saved = trained_run_config().train.optimizer
    other = "adamw" if saved == "muon" else "muon"
    run = trained_run_config()
    run.train.optimizer = other
    with pytest.raises(KimbhoError) as error:
        kimbho.Trainer(run, data_dir, run_copy, resume=True, progress_bar=False)
    assert f"train.optimizer is {saved!r} in the checkpoint but {other!r} now" in one_line(error)
    trainer = kimbho.Trainer(run, data_dir, run_copy, force_resume=True, progress_bar=False)
    assert trainer.progress.step == 120 and not trainer.optimizer.state_dict()["state"]
    assert any(f"{saved}'s state is dropped" in m for m in kimbho_log)
    trainer.train_step(120)  # the fresh optimizer steps from the checkpoint's weights


def test_resume_refuses_another_dataset_or_tokenizer(
    run_copy: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "other.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 400)
    same_tokenizer = tmp_path / "same-tokenizer"
    kimbho.prepare([str(text)], same_tokenizer, tokenizer=data_dir / "tokenizer.json", val_fraction=0)
    with pytest.raises(KimbhoError) as error:
        kimbho.Trainer(trained_run_config(), same_tokenizer, run_copy, resume=True, progress_bar=False)
    assert "the dataset's train split differs" in one_line(error)

    other_tokenizer = tmp_path / "other-tokenizer"
    kimbho.prepare([str(text)], other_tokenizer, vocab_size=300, val_fraction=0)
    with pytest.raises(KimbhoError) as error:
        kimbho.Trainer(trained_run_config(), other_tokenizer, run_copy, resume=True, progress_bar=False)
    assert "the tokenizer differs" in one_line(error)

    capsys.readouterr()
    args = ["train", "--preset", "tiny", "--data", same_tokenizer, "--out", run_copy, "--resume"]
    assert run_cli(*args, "train.batch_size=8", "train.seq_len=64") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume from" in err and "train split differs" in err


# --- safe loading ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this opens (so creates) a file: what a malicious pickle would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes pickle.dump's protocol
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(
    run_copy: Path, data_dir: Path, tmp_path: Path, writer: str, kimbho_log: list[str]
) -> None:
    pickle.loads(pickle.dumps(_Payload(tmp_path / "proof"))).close()
    assert (tmp_path / "proof").exists(), "the payload runs when unpickled the unsafe way"

    marker = tmp_path / "pwned"
    ckpt = run_copy / LAST
    evil = {"optimizer": _Payload(marker), "progress": {}, "rng": {}}
    if writer == "torch.save":
        torch.save(evil, ckpt / "trainer.pt")
    else:
        with open(ckpt / "trainer.pt", "wb") as f:
            pickle.dump(evil, f)
    # Whoever can replace the file can rewrite the manifest: integrity checks alone cannot help.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = hashlib.sha256((ckpt / "trainer.pt").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    verify(ckpt)

    with pytest.raises(CorruptCheckpoint) as error:
        load_trainer_state(ckpt)
    message = one_line(error)
    assert message.startswith(f"refusing to load {ckpt / 'trainer.pt'}") and "could run code" in message
    trainer = kimbho.Trainer(trained_run_config(), data_dir, run_copy, resume=True, progress_bar=False)
    assert trainer.progress.step == 60
    assert any("refusing to load" in m for m in kimbho_log)
    assert not marker.exists()


def test_no_unsafe_loader_in_the_source() -> None:
    """Nothing Kimbho loads can run code: no pickle, no unrestricted torch.load, no unsafe YAML."""
    unsafe = re.compile(
        r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|yaml\.(unsafe_)?load\("
    )
    for path in Path(kimbho.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert not unsafe.search(text), f"{path}: {unsafe.search(text)}"
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


# --- failed saves ----------------------------------------------------------------------------------


def _short_trainer(data_dir: Path, out: Path) -> kimbho.Trainer:
    run = tiny_run_config(batch_size=4, seq_len=32, max_steps=4, save_every=2, eval_every=0)
    return kimbho.Trainer(run, data_dir, out, progress_bar=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj: object, f: BinaryIO, *args: object, **kwargs: object) -> None:
        calls.append(f)
        if len(calls) == 2:
            f.write(b"PK\3\4 partial")  # what a disk filling up mid-write leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    out = tmp_path / "run"
    with pytest.raises(KimbhoError) as error:
        _short_trainer(data_dir, out).fit()
    message = one_line(error)
    assert re.search(
        r"could not save checkpoint \S+step-00000004 \(trainer.pt\): No space left on device", message
    )
    assert f"{out / 'checkpoints' / 'step-00000002'} is intact and --resume continues from it" in message
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    verify(out / "checkpoints" / "step-00000002")
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_real_write_error_during_a_save(data_dir: Path, tmp_path: Path) -> None:
    """A true failing write, not a mock: a file-size limit (RLIMIT_FSIZE) that model.safetensors
    fits under but trainer.pt (the Adam moments make it twice as big) does not."""
    import resource  # POSIX only

    out = tmp_path / "run"
    trainer = _short_trainer(data_dir, out)
    trainer.train_step(0)
    trainer.progress.step = 1
    first = trainer.save()
    limit = (first / "model.safetensors").stat().st_size + 4096
    assert (first / "trainer.pt").stat().st_size > limit
    trainer.progress.step = 2
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a killed process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(KimbhoError) as error:
            trainer.save()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert "could not save checkpoint" in one_line(error) and "(trainer.pt): File too large" in str(
        error.value
    )
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    verify(first)
    assert not list((out / "checkpoints").glob(".tmp-*"))
