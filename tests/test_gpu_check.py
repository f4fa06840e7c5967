"""bench/gpu_check.py, the script a GPU machine runs, as far as a CPU can check it: every check
on a tiny model, and the one-line refusal without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def test_every_check_runs_on_a_cpu_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    command = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--steps", "8", "--batch", "4",
        "--seq-len", "32", "--decode-tokens", "8", "--compile", "false", "--work", str(tmp_path), "--out", str(out),
    ]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert result["train"]["last_loss"] < result["train"]["first_loss"]
    assert result["train"]["tokens_per_sec_median"] > 0 and 0 < result["train"]["mfu_median"] < 1
    assert result["resume"] == {"steps_compared": 4, "max_loss_difference": 0.0}  # exact on a CPU
    assert result["decode"]["batch_1_tokens_per_sec"] > 0 and result["decode"]["batch_32_tokens_per_sec"] > 0
    assert result["parity"]["fp32"]["max_abs_logit_difference"] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_without_a_gpu_it_stops_at_once_with_one_line() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr.strip().startswith("gpu_check: no CUDA GPU here") and len(r.stderr.strip().splitlines()) == 1
    )
