"""Resume policy: what may differ between a checkpoint and the run that continues it (refused:
another model config, tokenizer, dataset or optimizer; allowed with a warning: other train
settings)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from ..storage import checkpoints
from ..storage.checkpoints import read_model_config
from ..storage.files import read_mapping

log = logging.getLogger("kimbho")


def saved_train_config(ckpt: Path) -> dict[str, Any]:
    """The `train:` section of the run config a checkpoint was made with."""
    return read_mapping(ckpt / "run.yaml", checkpoints.CorruptCheckpoint).get("train") or {}


def resume_differences(
    ckpt: Path, state: dict[str, Any], run: RunConfig, fingerprint: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """What differs between checkpoint `ckpt` (with its trainer `state`) and the run about to
    continue it: (differences that make resuming wrong: model config, tokenizer, dataset;
    train-config changes, which are allowed)."""
    refusals = []
    saved = read_model_config(ckpt)
    for key, value in saved.to_dict().items():
        now = getattr(run.model, key)
        if now != value:
            refusals.append(f"model.{key} is {value!r} in the checkpoint but {now!r} now")
    saved_fp = state.get("fingerprint") or {}
    if saved_fp.get("tokenizer_sha256", fingerprint["tokenizer_sha256"]) != fingerprint["tokenizer_sha256"]:
        refusals.append(
            f"the tokenizer differs (sha256 {saved_fp['tokenizer_sha256'][:12]}... in the checkpoint, "
            f"{fingerprint['tokenizer_sha256'][:12]}... now)"
        )
    for split, was in (saved_fp.get("dataset") or {}).items():
        now = fingerprint["dataset"].get(split)
        if was != now:
            refusals.append(
                f"the dataset's {split} split differs ({_describe_split(was)} in the checkpoint, "
                f"{_describe_split(now)} now)"
            )
    refusals += _lora_differences(saved_fp.get("lora"), fingerprint.get("lora"))
    saved_train = saved_train_config(ckpt)
    current_train = run.to_dict()["train"]
    if saved_train.get("optimizer", current_train["optimizer"]) != current_train["optimizer"]:
        refusals.append(
            f"train.optimizer is {saved_train['optimizer']!r} in the checkpoint but "
            f"{current_train['optimizer']!r} now, and its state cannot carry over"
        )
    changes = [
        f"train.{key} {saved_train[key]!r} -> {value!r}"
        for key, value in current_train.items()
        if key in saved_train and saved_train[key] != value
    ]
    return refusals, changes


def _lora_differences(was: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """A LoRA run continues only with its own adapters' shape, over the base they adapt."""
    if was == now:
        return []
    if was is None or now is None:
        kinds = ("full fine-tuning or pretraining", "LoRA") if now else ("LoRA", "full fine-tuning")
        return [f"the checkpoint is of {kinds[0]} and this run is {kinds[1]} (lora.rank)"]
    found = []
    if (was["rank"], was["alpha"]) != (now["rank"], now["alpha"]):
        found.append(
            f"lora.rank/alpha are {was['rank']}/{was['alpha']} in the checkpoint but {now['rank']}/{now['alpha']} now"
        )
    if was["base"]["sha256"] != now["base"]["sha256"]:
        found.append(
            f"the checkpoint's adapters are of base {was['base']['path']} (weights sha256 {was['base']['sha256'][:12]}...), "
            f"this run's base is {now['base']['path']} (sha256 {now['base']['sha256'][:12]}...)"
        )
    return found


def _describe_split(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "absent"
    return f"{fingerprint['tokens']:,} tokens with sha256 {fingerprint['sha256'][:12]}..."


# A checkpoint chosen for resuming: its path, trainer state and weights (read by rank 0).
Found = tuple[Path, dict[str, Any], dict[str, torch.Tensor]]


def find_checkpoint(
    run_dir: Path,
    existing: list[Path],
    force: bool,
    run: RunConfig,
    fingerprint: dict[str, Any],
    model: KimbhoV1Model,
) -> Found | None:
    """The newest of `existing` that loads into `model` and may continue `run` (`force`: even
    with another model config, tokenizer or dataset); unusable ones are set aside with a warning."""
    for ckpt in reversed(existing):
        try:
            return _read(ckpt, force, run, fingerprint, model)
        except checkpoints.CorruptCheckpoint as e:
            aside = checkpoints.set_aside(ckpt)
            log.warning(f"{e}; set it aside as {aside.name} and falling back to the previous checkpoint")
    if existing:
        raise KimbhoError(
            f"no usable checkpoint in {run_dir / checkpoints.CHECKPOINTS} (see the warnings above); "
            f"run again with --resume to start from step 0"
        )
    log.warning(f"--resume: {run_dir} has no checkpoint yet, starting from step 0")
    return None


def _read(
    ckpt: Path, force: bool, run: RunConfig, fingerprint: dict[str, Any], model: KimbhoV1Model
) -> Found:
    checkpoints.verify(ckpt)
    state = checkpoints.load_trainer_state(ckpt)
    refusals, changes = resume_differences(ckpt, state, run, fingerprint)
    if refusals and not force:
        raise KimbhoError(
            f"cannot resume from {ckpt}: {'; '.join(refusals)}. Use the run's original settings "
            f"(see {ckpt / 'run.yaml'}) or pass --force-resume to continue anyway"
        )
    if refusals:
        log.warning(f"--force-resume: continuing from {ckpt} although {'; '.join(refusals)}")
    if changes:
        log.warning(
            f"train config changed since {ckpt.name}: {', '.join(changes)}; continuing with the new values"
        )
    optimizer = run.train.optimizer
    saved_optimizer = saved_train_config(ckpt).get("optimizer", optimizer)
    if saved_optimizer != optimizer:  # only with --force-resume (a refusal otherwise)
        log.warning(f"--force-resume: {saved_optimizer}'s state is dropped; {optimizer} starts afresh")
        state["optimizer"] = None
    return ckpt, state, checkpoints.read_weights(ckpt, model)
