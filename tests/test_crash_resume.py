"""Kill training with SIGKILL before, during and after a save; every resume must start from a
complete checkpoint and end bit-identical to a run that was never interrupted.

The faults come from the test side (tests/crash_driver.py wraps a function of the running
process so that its N-th call kills the process), not from hooks in Kimbho. Run with `-s` to
see the kill points and the result."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kimbho
from kimbho.config import RunConfig
from kimbho.storage.checkpoints import list_checkpoints, verify
from kimbho.training.metrics import read_metrics
from tests.conftest import tiny_run_config, without_wall_clock

DRIVER = Path(__file__).with_name("crash_driver.py")
MAX_STEPS = 12


def crash_config() -> RunConfig:
    """Gradient accumulation (2 micro-batches), dropout (draws from the saved RNG state), a
    validation and a best checkpoint every 4 steps, checkpoints every 4 steps, 2 kept, and a train
    record every 3 steps: a record's interval spans a checkpoint, so a resumed run must carry the
    losses of its first steps over."""
    run = tiny_run_config(
        batch_size=4,
        micro_batch_size=2,
        seq_len=32,
        warmup_steps=2,
        max_steps=MAX_STEPS,
        log_every=3,
        eval_every=4,
        eval_tokens=512,
        save_every=4,
        keep_last=2,
        sample_tokens=4,
    )
    run.model.dropout = 0.1
    return run


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    kimbho.Trainer(crash_config(), data_dir, out, progress_bar=False).fit()
    return out


class Driver:
    def __init__(self, data_dir: Path, out: Path) -> None:
        self.data_dir, self.out = data_dir, out
        self.config = out.parent / "run.json"
        self.config.write_text(json.dumps(crash_config().to_dict()))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(DRIVER), str(self.config), str(self.data_dir), str(self.out), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, each verified against its manifest."""
        for ckpt in list_checkpoints(self.out):
            verify(ckpt)
        return [int(c.name.removeprefix("step-")) for c in list_checkpoints(self.out)]

    def temporaries(self) -> list[str]:
        return sorted(p.name for p in (self.out / "checkpoints").glob(".tmp-*"))


def assert_same_as_reference(out: Path, reference: Path) -> str:
    """Every metrics record (less its wall-clock fields), final weights, optimizer state and the
    best checkpoint all identical."""
    final = f"checkpoints/step-{MAX_STEPS:08d}"
    want, got = without_wall_clock(read_metrics(reference)), without_wall_clock(read_metrics(out))
    assert [r["step"] for r in want if r["kind"] == "train"] == [3, 6, 9, 12]
    assert got == want
    a, b = load_file(reference / final / "model.safetensors"), load_file(out / final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(reference / final / "trainer.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(out / final / "trainer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    best_a = load_file(reference / "checkpoints/best/model.safetensors")
    best_b = load_file(out / "checkpoints/best/model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    return (
        f"{len(got)}/{len(want)} metrics records equal, {len(a)}/{len(a)} weight tensors torch.equal, "
        f"optimizer state and best checkpoint equal"
    )


@pytest.mark.precision
def test_killed_runs_resume_bit_identically(data_dir: Path, tmp_path: Path, reference: Path) -> None:
    """One run, killed three times and stopped once by SIGTERM, resumed four times."""
    driver = Driver(data_dir, tmp_path / "run")
    print()

    r = driver.run("--at", "before:kimbho.training.trainer.Trainer.train_step:7")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert driver.complete_steps() == [4]
    print(
        f"SIGKILL between saves (at the start of step 7):      rc {r.returncode}, checkpoints {driver.complete_steps()}"
    )

    r = driver.run("--resume", "--at", "after:torch.save:1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resumed from" in r.stderr and "step-00000004 at step 4" in r.stderr
    assert driver.complete_steps() == [4] and driver.temporaries(), "killed inside the save of step 8"
    print(
        f"SIGKILL during the save of step 8 (trainer.pt written): rc {r.returncode}, checkpoints "
        f"{driver.complete_steps()}, half-written {driver.temporaries()}"
    )

    r = driver.run("--resume", "--at", "after:kimbho.training.trainer.Trainer.save:1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "removing incomplete checkpoint" in r.stderr and not driver.temporaries()
    assert driver.complete_steps() == [4, 8]
    print(
        f"SIGKILL just after the save of step 8:               rc {r.returncode}, checkpoints {driver.complete_steps()}"
    )

    r = driver.run(
        "--resume", "--signal", "TERM", "--at", "before:kimbho.training.trainer.Trainer.train_step:2"
    )
    assert r.returncode == 0, r.stderr
    assert "stopped by SIGTERM after step 10" in r.stderr
    assert driver.complete_steps() == [8, 10]
    print(
        f"SIGTERM during step 10 (finishes it, saves, exit 0): rc {r.returncode}, checkpoints {driver.complete_steps()}"
    )

    r = driver.run("--resume")
    assert r.returncode == 0, r.stderr
    assert driver.complete_steps() == [10, 12]
    result = assert_same_as_reference(driver.out, reference)
    print(f"resumed to step {MAX_STEPS}, compared with the uninterrupted run: {result}")


# (name, kill point, complete checkpoints and temporaries left behind, without their pid suffix)
SINGLE_KILL_POINTS = [
    ("before-first-step", "before:kimbho.training.trainer.Trainer.train_step:1", [], []),
    ("after-3rd-metrics-record", "after:kimbho.training.metrics.MetricsLog.write:3", [], []),
    ("step-4-weights-written", "after:kimbho.storage.checkpoints.save_file:2", [], [".tmp-step-00000004"]),
    ("best-being-fsynced", "after:kimbho.storage.checkpoints._fsync:4", [], [".tmp-best"]),
    (
        "step-4-complete-not-renamed",
        "before:kimbho.storage.checkpoints._replace_dir:2",
        [],
        [".tmp-step-00000004"],
    ),
    (
        "step-4-renamed-parent-not-fsynced",
        r"after:os.replace:1:\.tmp-step-00000004-\d+ \S+/step-00000004$",
        [4],
        [],
    ),
    (
        "old-best-renamed-away",
        r"after:os.replace:1:/best \S+\.tmp-old-best-",
        [4],
        [".tmp-best", ".tmp-old-best"],
    ),
    (
        "retention-renamed-step-4-away",
        r"after:os.replace:1:/step-00000004 \S+\.tmp-old-step-00000004-",
        [8, 12],
        [".tmp-old-step-00000004"],
    ),
    ("after-the-final-save", "after:kimbho.training.trainer.Trainer.save:3", [8, 12], []),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "steps", "temporaries"),
    [p[1:] for p in SINGLE_KILL_POINTS],
    ids=[p[0] for p in SINGLE_KILL_POINTS],
)
def test_kill_at_any_point_then_resume(
    point: str, steps: list[int], temporaries: list[str], data_dir: Path, tmp_path: Path, reference: Path
) -> None:
    driver = Driver(data_dir, tmp_path / "run")
    r = driver.run("--at", point)
    assert r.returncode == -signal.SIGKILL, f"the process was not killed at {point}: {r.stderr}"
    assert driver.complete_steps() == steps
    assert [re.sub(r"-\d+$", "", name) for name in driver.temporaries()] == temporaries
    r = driver.run("--resume")
    assert r.returncode == 0, r.stderr
    result = assert_same_as_reference(driver.out, reference)
    print(f"\nSIGKILL {point}: checkpoints {steps}, temporaries {temporaries} -> resumed: {result}")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_killed_fine_tuning_run_resumes_bit_identically(
    trained_run: Path, tokenizer: kimbho.Tokenizer, tmp_path: Path, lora_rank: int
) -> None:
    """Fine-tuning, full and LoRA, killed between saves: the resumed run ends as the
    uninterrupted one (metrics, and the weights or adapters it saves)."""
    from kimbho.config import LoraConfig
    from tests.test_finetune import _chat_data

    data = _chat_data(tokenizer, tmp_path)
    run = tiny_run_config(
        batch_size=4, optimizer="adamw", max_steps=6, save_every=3, eval_every=3, log_every=1, lr=1e-3
    )
    run.lora = LoraConfig(rank=lora_rank, alpha=8) if lora_rank else LoraConfig()
    reference = tmp_path / "reference"
    kimbho.Trainer(run, data, reference, progress_bar=False, init_from=trained_run).fit()
    driver = Driver(data, tmp_path / "killed")
    driver.config.write_text(json.dumps(run.to_dict()))
    r = driver.run("--init", str(trained_run), "--at", "before:kimbho.training.trainer.Trainer.train_step:5")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert driver.complete_steps() == [3]
    r = driver.run("--init", str(trained_run), "--resume")
    assert r.returncode == 0, r.stderr
    assert "step-00000003 at step 3" in r.stderr
    assert without_wall_clock(read_metrics(driver.out)) == without_wall_clock(read_metrics(reference))
    name = "adapter.safetensors" if lora_rank else "model.safetensors"
    a, b = (load_file(out / "checkpoints" / "step-00000006" / name) for out in (reference, driver.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
