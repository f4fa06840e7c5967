"""SIGTERM / SIGINT: finish the step, save a checkpoint, exit 0; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimbho.storage.checkpoints import list_checkpoints, verify
from kimbho.training.metrics import read_metrics
from kimbho.training.signals import GracefulStop
from tests.conftest import REPO


def test_signals_raise_a_flag_and_a_second_ctrl_c_interrupts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_zero(sig: signal.Signals, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kimbho", "train", "--preset", "tiny", "--data", data_dir, "--out", out]
    settings = ["train.batch_size=2", "train.seq_len=16", "train.log_every=1", "train.save_every=0"]
    process = subprocess.Popen(
        [*map(str, command), "--max-steps", "100000", *settings],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert f"received {sig.name}" in stderr and f"stopped by {sig.name} after step" in stderr
    assert "Traceback" not in stderr
    [ckpt] = list_checkpoints(out)
    verify(ckpt)
    last_step = read_metrics(out, "train")[-1]["step"]
    assert ckpt.name == f"step-{last_step:08d}", "the checkpoint holds the last finished step"
    assert stdout.startswith(f"stopped {out} at step {last_step} ({sig.name})")
