"""Training on 2 CPU processes (torchrun, gloo) against 1 process: DDP and FSDP2 equivalence,
checkpoints across process counts, a killed process, SIGTERM, and bad input.

The multi-process runs go through `kimbho train --nproc 2`, which runs torchrun in-process, as a
user would. Run with `-s` to see the per-step losses side by side."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kimbho
from kimbho.device import pick_precision
from kimbho.storage.checkpoints import list_checkpoints, verify
from kimbho.training.metrics import read_metrics
from tests.conftest import REPO, run_cli, tiny_run_config

STEPS = 6
# Gradient accumulation (per process: 4 rows in 2 micro-batches of 2), validation, samples and
# checkpoints every 3 steps; everything the loop does happens in these few steps.
TRAIN_ARGS = [
    "--preset",
    "tiny",
    f"train.max_steps={STEPS}",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_tokens=512",
    "train.save_every=3",
    "train.sample_tokens=4",
    "train.seed=0",
]
TOLERANCE = 1e-4
# The runs use train.precision=auto. In bf16 the weights of 1 and 2 processes drift further apart
# (sums of bf16 products in another order; Newton-Schulz in bf16): a few elements by up to 1.2e-3
# after 6 steps (measured with bf16 forced on an AVX2 Zen 3), where the weights are ~0.02; so bf16
# compares each tensor as a whole.
BF16 = pick_precision("auto", torch.device("cpu")) == torch.bfloat16


def assert_same_weights(got: torch.Tensor, want: torch.Tensor) -> None:
    if BF16:
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    else:
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


# The optimizer each parallel mode is tested with: Muon (the default) needs whole matrices, so
# FSDP runs AdamW (a Muon run under FSDP is refused).
OPTIMIZER = {"ddp": "muon", "fsdp": "adamw"}


def kimbho_train(
    *args: object, wait: bool = True
) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    """`python -m kimbho train ARGS` in a subprocess (started, or run to the end)."""
    command = [sys.executable, "-m", "kimbho", "train", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def losses(run: Path) -> list[float]:
    records = read_metrics(run, "train")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "one record per step"
    return [r["loss"] for r in records]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def show(title: str, runs: dict[str, list[float]]) -> float:
    """Print the per-step losses side by side; returns the largest difference from the first."""
    names = list(runs)
    reference = runs[names[0]]
    print(f"\n{title}\nstep  " + "  ".join(f"{n:>12}" for n in names) + "     max |diff|")
    worst = 0.0
    for step, values in enumerate(zip(*runs.values(), strict=True), start=1):
        diff = max(abs(v - values[0]) for v in values)
        worst = max(worst, diff)
        print(f"{step:>4}  " + "  ".join(f"{v:12.7f}" for v in values) + f"     {diff:.1e}")
    print(f"max |diff| over {len(reference)} steps: {worst:.2e}")
    return worst


@pytest.fixture(scope="module")
def one_process(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The 1-process run with a given optimizer (trained once per module)."""
    runs: dict[str, Path] = {}

    def run(optimizer: str) -> Path:
        if optimizer not in runs:
            out = tmp_path_factory.mktemp("dist") / f"one-{optimizer}"
            args = [*TRAIN_ARGS, f"train.optimizer={optimizer}"]
            assert run_cli("-q", "train", "--data", data_dir, "--out", out, *args) == 0
            runs[optimizer] = out
        return runs[optimizer]

    return run


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("dist") / request.param
    r = kimbho_train("--nproc", 2, "--data", data_dir, "--out", out, *TRAIN_ARGS, *settings_of(request.param))
    assert r.returncode == 0, r.stderr
    assert f"x 2 processes ({request.param})" in r.stderr
    assert r.stdout.count("finished") == 1 and r.stdout.count("val loss") == 2  # rank 0 speaks alone
    return out


def settings_of(parallel: str) -> list[str]:
    return [f"train.parallel={parallel}", f"train.optimizer={OPTIMIZER[parallel]}"]


@pytest.mark.precision
def test_two_processes_match_one_step_for_step(
    one_process: Callable[[str], Path], two_processes: Path
) -> None:
    parallel = two_processes.name
    one = one_process(OPTIMIZER[parallel])
    worst = show(
        f"per-step loss, global batch 8 x 32 tokens: 1 process vs 2 processes ({parallel})",
        {"1 process": losses(one), f"2 proc {parallel}": losses(two_processes)},
    )
    assert len(losses(two_processes)) == STEPS and worst <= TOLERANCE
    evals = [r["val_loss"] for r in read_metrics(two_processes, "eval")]
    assert evals == pytest.approx([r["val_loss"] for r in read_metrics(one, "eval")], abs=TOLERANCE)
    assert len(read_metrics(two_processes, "sample")) == 2
    # Checkpoints in the single-process layout: bare-module names, whole tensors.
    a, b = weights(one), weights(two_processes)
    assert a.keys() == b.keys() and not any(k.startswith(("module.", "_orig_mod.", "model.")) for k in b)
    for name in a:
        assert_same_weights(b[name], a[name])
    state = torch.load(two_processes / "checkpoints" / f"step-{STEPS:08d}" / "trainer.pt", weights_only=True)
    assert len(state["rng_by_rank"]) == 2 and state["progress"]["step"] == STEPS
    assert set(state["optimizer"]["state"]) == set(a)  # whole optimizer state, by parameter name


@pytest.mark.precision
def test_checkpoint_resumes_exactly_on_two_processes_and_loads_in_one(
    one_process: Callable[[str], Path], two_processes: Path, data_dir: Path, tmp_path: Path
) -> None:
    parallel = two_processes.name
    # As after a crash after step 3: only that checkpoint is left.
    resumed = tmp_path / "resumed"
    shutil.copytree(two_processes, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    settings = [*TRAIN_ARGS, *settings_of(parallel), "--resume"]
    r = kimbho_train("--nproc", 2, "--data", data_dir, "--out", resumed, *settings)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "step-00000003" in r.stderr
    assert losses(resumed) == losses(two_processes)
    a, b = weights(two_processes), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The same checkpoint continued by one process: each batch is re-split, the curve goes on.
    single = tmp_path / "single"
    shutil.copytree(resumed, single)
    shutil.rmtree(single / "checkpoints" / f"step-{STEPS:08d}")
    assert run_cli("-q", "train", "--data", data_dir, "--out", single, *settings) == 0
    show(
        f"resumed at step 3 from the 2-process ({parallel}) checkpoint",
        {"2 processes": losses(two_processes), "then 1 proc": losses(single)},
    )
    assert losses(single) == pytest.approx(losses(one_process(OPTIMIZER[parallel])), abs=TOLERANCE)

    # generate and export read it like any checkpoint.
    model, tokenizer = kimbho.load(resumed)
    ids = kimbho.generate(model, torch.tensor([[tokenizer.eot_id]]), max_new_tokens=5, temperature=0.0)
    assert ids.shape == (1, 6)
    assert run_cli("export", "hf", resumed, tmp_path / "hf") == 0


def test_a_refused_resume_is_reported_once(
    data_dir: Path, one_process: Callable[[str], Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_process("muon"), run)
    r = kimbho_train(
        "--nproc", 2, "--data", data_dir, "--out", run, *TRAIN_ARGS, "model.num_blocks=3", "--resume"
    )
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("kimbho: error:")]
    assert len(errors) == 1 and "cannot resume" in errors[0] and "num_blocks" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the training process of `rank` started by the launcher process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def _start_long_run(data_dir: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """A 2-process run long enough to be interrupted, returned once it has done 3 steps (and
    saved the checkpoint of step 2)."""
    args = [*TRAIN_ARGS, "train.max_steps=1000", "train.save_every=2", "train.eval_every=0", *extra]
    proc = kimbho_train("--nproc", 2, "--data", data_dir, "--out", out, *args, wait=False)
    deadline = time.monotonic() + 120
    while _steps_logged(out) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc  # type: ignore[return-value]


def _steps_logged(run: Path) -> int:
    """Train records in metrics.jsonl so far (read while it is written: whole lines only)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    return sum(line.endswith("\n") and '"kind": "train"' in line for line in lines)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_a_killed_process_ends_the_job_and_the_run_resumes(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start_long_run(data_dir, out)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=90)  # torchrun stops rank 0; nothing waits forever
    print(
        f"\njob ended {time.monotonic() - start:.1f} s after rank 1 was killed, exit status {proc.returncode}"
    )
    assert proc.returncode == 1
    assert "training process 1 was killed by SIGKILL" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    steps = [int(c.name.removeprefix("step-")) for c in list_checkpoints(out)]
    assert steps and all(verify(c) for c in list_checkpoints(out))

    # Resumed with torchrun itself, as on a cluster.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "kimbho", "train", "--data", str(data_dir), "--out", str(out), *TRAIN_ARGS]
    command += [f"train.max_steps={steps[-1] + 2}", "--resume"]
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"step-{steps[-1]:08d}" in r.stderr
    assert read_metrics(out, "train")[-1]["step"] == steps[-1] + 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_sigterm_to_one_process_stops_all_after_the_same_step(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start_long_run(data_dir, out)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 0 never sees the signal itself
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    stopped_at = read_metrics(out, "train")[-1]["step"]
    assert f"stopped {out} at step {stopped_at} (SIGTERM)" in stdout
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at:08d}"
    verify(list_checkpoints(out)[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals the launcher process")
def test_sigterm_to_the_launcher_saves_and_stops(data_dir: Path, tmp_path: Path) -> None:
    """As SLURM or Kubernetes would: torchrun forwards the signal to every process."""
    out = tmp_path / "run"
    proc = _start_long_run(data_dir, out, *settings_of("fsdp"))
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = read_metrics(out, "train")[-1]["step"]
    assert f"stopped {out} at step {stopped_at} (SIGTERM)" in stdout
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at:08d}"


def test_bad_input_is_one_clear_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    cases = [  # (options, overrides, message)
        (["--nproc", "0"], [], "--nproc must be at least 1, got 0"),
        (
            ["--nproc", "3"],
            [],
            "train.batch_size=8 does not split evenly over 3 processes; use a multiple of 3",
        ),
        (
            ["--nproc", "2"],
            ["train.micro_batch_size=3"],
            "train.batch_size=8 is not a multiple of processes x train.micro_batch_size = 2 x 3 = 6",
        ),
        ([], ["train.parallel=tp"], "train.parallel='tp' is not one of: ddp, fsdp"),
        ([], ["train.dist_timeout=0"], "train.dist_timeout must be positive"),
    ]
    for options, overrides, message in cases:
        assert run_cli("train", *options, "--data", data_dir, "--out", out, *TRAIN_ARGS, *overrides) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kimbho: error: ") and message in err[0], err
    assert not out.exists()


def test_nproc_under_torchrun_is_refused(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert run_cli("train", "--nproc", "2", "--data", data_dir, "--out", tmp_path / "run", *TRAIN_ARGS) == 1
    assert "under torchrun (or srun) leave it out" in capsys.readouterr().err


def test_muon_under_fsdp_is_refused_once(data_dir: Path, tmp_path: Path) -> None:
    r = kimbho_train(
        "--nproc", 2, "--data", data_dir, "--out", tmp_path / "run", *TRAIN_ARGS, "train.parallel=fsdp"
    )
    assert isinstance(r, subprocess.CompletedProcess) and r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("kimbho: error:")]
    assert len(errors) == 1 and "train.optimizer=muon needs whole weight matrices" in errors[0], r.stderr


def test_fsdp_in_one_process_trains_unsharded(data_dir: Path, tmp_path: Path, kimbho_log: list[str]) -> None:
    trainer = kimbho.Trainer(tiny_run_config(parallel="fsdp"), data_dir, tmp_path / "run", progress_bar=False)
    assert trainer.world.size == 1 and trainer.train_model is trainer.model
    assert any("one process has nothing to shard over" in m for m in kimbho_log)


def test_optimizer_state_of_older_checkpoints_is_keyed_by_name(data_dir: Path, tmp_path: Path) -> None:
    """Checkpoints written before multi-process training hold `optimizer.state_dict()`, keyed by
    position; they resume as well."""
    from kimbho.training.distributed import _keyed_by_name, full_optimizer_state

    trainer = kimbho.Trainer(tiny_run_config(), data_dir, tmp_path / "run", progress_bar=False)
    trainer.train_step(0)
    by_name = full_optimizer_state(trainer.model, trainer.optimizer)
    converted = _keyed_by_name(trainer.model, trainer.optimizer, trainer.optimizer.state_dict())
    assert converted["param_groups"] == by_name["param_groups"]
    assert (
        converted["state"].keys() == by_name["state"].keys() == dict(trainer.model.named_parameters()).keys()
    )
    for name, values in by_name["state"].items():
        for key, value in values.items():
            assert torch.equal(converted["state"][name][key], value)
    assert _keyed_by_name(trainer.model, trainer.optimizer, by_name) is by_name


@pytest.mark.precision
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fine_tuning_on_two_processes_matches_one(trained_run: Path, tmp_path: Path, lora_rank: int) -> None:
    """`kimbho finetune --nproc 2` (rank 0 packs the data, both train on halves of each batch)
    takes the steps one process takes, full and LoRA. Rows hold different numbers of reply
    tokens, so this also checks that the loss is the mean over the global batch's targets."""
    from tests.test_finetune import _conversation, _write_jsonl

    data = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(i) for i in range(80)])
    args = ["--data", data, "--max-steps", 4, "train.batch_size=8", "train.micro_batch_size=2",
            "train.log_every=1", "train.eval_every=2", f"lora.rank={lora_rank}"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("-q", "finetune", trained_run, "--out", one, *args) == 0
    command = [
        sys.executable,
        "-m",
        "kimbho",
        "finetune",
        str(trained_run),
        "--out",
        str(two),
        "--nproc",
        "2",
    ]
    r = subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "x 2 processes (ddp)" in r.stderr and r.stdout.count("finished") == 1
    worst = show("fine-tuning loss: 1 process vs 2", {"1 process": losses(one), "2 processes": losses(two)})
    # In bf16 the two processes' sums of products differ in order (4e-4 at most, measured with
    # bf16 forced on an AVX2 Zen 3, on losses of ~1-4 nats).
    assert len(losses(two)) == 4 and worst <= (2e-3 if BF16 else TOLERANCE)
    name = "adapter.safetensors" if lora_rank else "model.safetensors"
    a, b = (load_file(run / "checkpoints" / "step-00000004" / name) for run in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        assert_same_weights(b[key], a[key])
