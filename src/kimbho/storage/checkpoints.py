"""Checkpoints you can trust: complete or absent, verified on load, loadable without running code.

    checkpoints/step-00000100/
        model.safetensors   weights of the bare model (no compile/DDP prefixes), whole even when
                            training sharded them over processes (FSDP)
        (a LoRA run has instead)
        adapter.safetensors the adapters alone (`model/lora.py`), and
        adapter.json        their rank and alpha, and the base they adapt: its path and the
                            SHA-256 of its weights, checked whenever the adapters are loaded
        config.json         the model config ({"format": "kimbho", ...KimbhoConfig fields})
        tokenizer.json      so a checkpoint directory is a complete model on its own
        run.yaml            the resolved run config
        trainer.pt          optimizer state (keyed by parameter name), progress (step, tokens seen),
                            the data position, every RNG state (of each process), the step guard's
                            state, the tokenizer hash and the dataset fingerprint: tensors and plain
                            containers only, so
                            torch.load(weights_only=True) reads it and nothing in it can run code
        manifest.json       SHA-256 of every file above, written last
    checkpoints/best/       the weights with the lowest validation loss so far (no trainer.pt)

A checkpoint is written into a `.tmp-*` directory, every file and the directory are fsynced, and
only then is it renamed into place; a checkpoint being replaced or deleted is first renamed to a
`.tmp-*` name. So a `step-N/` that exists is complete whenever the process dies, and `.tmp-*`
leftovers are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import KimbhoConfig, RunConfig
from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from .files import read_mapping, sha256_of_file

log = logging.getLogger("kimbho")

CHECKPOINTS = "checkpoints"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
_SET_ASIDE_PREFIX = "unusable-"


class CorruptCheckpoint(KimbhoError):
    """A checkpoint file is missing, truncated, altered or unsafe to load. `--resume` falls back to
    the previous checkpoint past one of these; a mismatched config is a plain `KimbhoError`."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any] | None,
    run_config: RunConfig,
    tokenizer: Tokenizer,
    keep_last: int,
    name: str | None = None,
    chat_template: str | None = None,
    adapter: dict[str, Any] | None = None,
    **manifest_extra: Any,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically, then drop all but the newest `keep_last`.

    `weights` is the bare model's full state dict (`model.state_dict()`, or gathered from the
    processes, see `distributed.full_weights`); `run_config.model` is its config. `name` writes
    `checkpoints/<name>/` instead of `step-N/`, outside retention (the best checkpoint);
    `trainer_state=None` writes a weights-only checkpoint. `chat_template` (a fine-tuned model's,
    when it is a Jinja template rather than Kimbho's role tokens) goes in `chat_template.jinja`,
    where loading finds it as in a Hugging Face directory. `adapter` (a LoRA run's rank, alpha
    and base) makes `weights` the adapter tensors alone, written as adapter.safetensors with
    adapter.json. A failed write (disk full)
    raises a `KimbhoError` and leaves the existing checkpoints as they were, with no temporary
    directory behind."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or step_dir_name(step))
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writing = ""
    try:
        tmp.mkdir()
        writing = "model.safetensors" if adapter is None else ADAPTER_WEIGHTS
        _save_weights(weights, run_config.model, tmp / writing)
        if adapter is not None:
            writing = ADAPTER_CONFIG
            (tmp / writing).write_text(json.dumps(adapter, indent=2))
        writing = "config.json"
        (tmp / writing).write_text(json.dumps({"format": "kimbho", **run_config.model.to_dict()}, indent=2))
        writing = "tokenizer.json"
        tokenizer.save(tmp / writing)
        writing = "run.yaml"
        run_config.save(tmp / writing)
        if chat_template is not None:
            writing = "chat_template.jinja"
            (tmp / writing).write_text(chat_template)
        if trainer_state is not None:
            writing = "trainer.pt"
            # Through a Python file, so a failed write keeps its OSError (as the RuntimeError's context).
            with open(tmp / writing, "wb") as f:
                torch.save(trainer_state, f)
        writing = "manifest.json"
        files = {f.name: sha256_of_file(f) for f in sorted(tmp.iterdir())}
        (tmp / writing).write_text(json.dumps({"step": step, **manifest_extra, "files": files}, indent=2))
        writing = ""
        for written in tmp.iterdir():
            _fsync(written)
        _fsync(tmp)
        _replace_dir(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports write errors as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(run_dir) if p != final]
        kept = (
            f"{previous[-1]} is intact and --resume continues from it"
            if previous
            else "no earlier checkpoint"
        )
        what = f" ({writing})" if writing else ""
        raise KimbhoError(f"could not save checkpoint {final}{what}: {_reason(e)}; {kept}") from None
    if name is None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    return final


def _save_weights(weights: dict[str, torch.Tensor], config: KimbhoConfig, path: Path) -> None:
    # Tied embeddings are one tensor under two names: store it once, as the embedding
    # (`read_weights` restores the head from it), which is what safetensors' save_model does.
    tensors = {
        name: tensor.contiguous()
        for name, tensor in weights.items()
        if not (config.tie_embeddings and name == "head.weight")
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed away first, so at every instant
    `final` is either the old complete checkpoint, absent, or the new complete one."""
    old = _doomed(final)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint so that a crash midway leaves a `.tmp-*` name, never a partial `step-N/`."""
    doomed = _doomed(ckpt)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _doomed(ckpt: Path) -> Path:
    """Where a checkpoint goes on its way out: a `.tmp-*` name, removed on the next start if a
    crash leaves it."""
    return ckpt.parent / f"{_TMP_PREFIX}old-{ckpt.name}-{os.getpid()}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories `step-N/` of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove half-written (or half-deleted) checkpoints left by a crash during a save."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                log.warning(f"removing incomplete checkpoint {p} left by an interrupted save")
                shutil.rmtree(p, ignore_errors=True)


def set_aside(ckpt: Path) -> Path:
    """Rename an unusable checkpoint out of the way (kept for inspection, never resumed from)."""
    aside = ckpt.parent / f"{_SET_ASIDE_PREFIX}{ckpt.name}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    return aside


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest. Raises `CorruptCheckpoint`
    naming the first bad file."""
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        names = list(files.items())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpoint(
            f"checkpoint file {manifest_path} is missing or unreadable; the checkpoint is incomplete or corrupt"
        ) from None
    for name, digest in names:
        path = ckpt / name
        if Path(name).name != name:  # a manifest only ever names files inside its own directory
            raise CorruptCheckpoint(
                f"checkpoint file {manifest_path} names a file outside the checkpoint: {name!r}"
            )
        if not path.is_file():
            raise CorruptCheckpoint(f"checkpoint file {path} is missing")
        if sha256_of_file(path) != digest:
            raise CorruptCheckpoint(
                f"checkpoint file {path} is corrupt (its SHA-256 does not match manifest.json)"
            )
    return manifest


def read_model_config(ckpt: Path) -> KimbhoConfig:
    values = read_mapping(ckpt / "config.json", CorruptCheckpoint)
    values.pop("format", None)
    return KimbhoConfig.from_dict(values)


def read_weights(ckpt: Path, model: KimbhoV1Model) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, checked against `model`'s names and shapes (a sharded
    model's parameters report their full shapes); of a LoRA checkpoint, its adapter.safetensors,
    checked against `model`'s adapters."""
    from ..model.lora import adapter_weights

    adapted = (ckpt / ADAPTER_CONFIG).is_file()
    path = ckpt / (ADAPTER_WEIGHTS if adapted else "model.safetensors")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CorruptCheckpoint(f"cannot read weights {path}: {_reason(e)}") from None
    if model.config.tie_embeddings and not adapted:
        state.setdefault("head.weight", state.get("embed.weight", torch.empty(0)))
        state.setdefault("embed.weight", state["head.weight"])
    expected = adapter_weights(model.state_dict()) if adapted else model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise KimbhoError(
            f"weights {path} do not fit the model config: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise KimbhoError(
                f"weights {path}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    return state


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer/RNG/progress state. `weights_only=True`: a pickle that would run code (or
    build any object that is not a tensor or plain container) is refused before it runs."""
    path = ckpt / "trainer.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint file {path} is missing") from None
    except pickle.UnpicklingError as e:  # weights_only refused something: nothing has run
        found = re.search(r"Unsupported [^\n]*?(?= was not an allowed|\.|\n|$)", str(e))
        what = f" ({found.group(0)})" if found else ""
        raise CorruptCheckpoint(
            f"refusing to load {path}: it holds more than tensors and plain containers{what}, "
            f"and unpickling it could run code"
        ) from None
    except Exception as e:  # RuntimeError for a truncated or altered zip archive
        raise CorruptCheckpoint(f"checkpoint file {path} is corrupt or truncated ({_reason(e)})") from None
    if not isinstance(state, dict) or not {"optimizer", "progress", "rng"} <= set(state):
        raise CorruptCheckpoint(f"checkpoint file {path} does not hold a Kimbho trainer state")
    return state


def _reason(e: BaseException) -> str:
    """Why `e` happened, in a few words: the OS error behind it if there is one (torch reports a
    failed write as a RuntimeError raised while handling the OSError), else its first sentence."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # some libraries colour their messages
    return text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
