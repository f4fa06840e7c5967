"""Checkpoints: written atomically, verified on load, and loadable without running code.

    checkpoints/step-00000100/
        model.safetensors   weights of the bare model (no compile/DDP prefixes)
        config.json         the model config ({"format": "kimbho", ...KimbhoConfig fields})
        tokenizer.json      so a checkpoint directory is a complete model on its own
        run.yaml            the resolved run config
        trainer.pt          optimizer state, step, tokens seen, RNG states: tensors and plain
                            containers only, loaded with torch.load(weights_only=True)
        manifest.json       SHA-256 of every file above, written last

A checkpoint is written into a temporary directory, every file and the directory are fsynced,
and only then is it renamed into place: a `step-N/` that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from .config import KimbhoConfig, RunConfig
from .errors import KimbhoError
from .model import KimbhoV1Model
from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: KimbhoV1Model,
    trainer_state: dict[str, Any],
    run_config: RunConfig,
    tokenizer: Tokenizer,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically, then drop all but the newest `keep_last`."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"format": "kimbho", **model.config.to_dict()}, indent=2))
        tokenizer.save(tmp / "tokenizer.json")
        run_config.save(tmp / "run.yaml")
        torch.save(trainer_state, tmp / "trainer.pt")
        manifest = {"step": step, "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KimbhoError(
            f"could not save checkpoint {final} ({e.strerror or e}); the previous ones are intact"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash during a save."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                log.warning(f"removing incomplete checkpoint {p} left by an interrupted save")
                shutil.rmtree(p, ignore_errors=True)


def verify(ckpt: Path) -> None:
    """Check every file against the manifest; one clear error naming the first bad file."""
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise KimbhoError(
            f"checkpoint {ckpt} has no readable manifest.json; it is incomplete or corrupt"
        ) from None
    for name, digest in files.items():
        path = ckpt / name
        if not path.is_file():
            raise KimbhoError(f"checkpoint file {path} is missing")
        if _sha256(path) != digest:
            raise KimbhoError(f"checkpoint file {path} is corrupt (its SHA-256 does not match the manifest)")


def read_model_config(ckpt: Path) -> KimbhoConfig:
    try:
        values = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise KimbhoError(f"{ckpt / 'config.json'} is missing or not valid JSON") from None
    values.pop("format", None)
    return KimbhoConfig.from_dict(values)


def load_weights(model: KimbhoV1Model, ckpt: Path) -> None:
    """Load model.safetensors into `model`, refusing missing, extra or misshapen tensors."""
    path = ckpt / "model.safetensors"
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise KimbhoError(f"cannot read weights {path}: {e}") from None
    if model.config.tie_embeddings:
        state.setdefault("head.weight", state.get("embed.weight", torch.empty(0)))
        state.setdefault("embed.weight", state["head.weight"])
    expected = model.state_dict()
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
    model.load_state_dict(state)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer/RNG/progress state. `weights_only=True`: a pickle that would run code is refused."""
    path = ckpt / "trainer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KimbhoError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for corrupt zips
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise KimbhoError(f"refusing to load {path}: it is not a plain tensor file ({first})") from None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from a run directory (its newest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise KimbhoError(f"model path {path} does not exist")
    if (p / "config.json").is_file():
        return p
    checkpoints = list_checkpoints(p)
    if checkpoints:
        return checkpoints[-1]
    raise KimbhoError(
        f"{path} is not a model: expected a run directory with checkpoints/, a checkpoint directory "
        f"or a Hugging Face model directory (with config.json)"
    )


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[KimbhoV1Model, Tokenizer]:
    """`(model, tokenizer)` from a run directory, a checkpoint directory or a local Hugging Face
    Llama directory. The model is in eval mode."""
    ckpt = resolve_checkpoint(path)
    config_values = _read_json(ckpt / "config.json")
    if config_values.get("format") != "kimbho":
        from .interop.hf import load_hf_directory

        model, tokenizer = load_hf_directory(ckpt)
    else:
        if (ckpt / "manifest.json").is_file():
            verify(ckpt)
        config = read_model_config(ckpt)
        model = KimbhoV1Model(config)
        load_weights(model, ckpt)
        tokenizer_path = ckpt / "tokenizer.json"
        if not tokenizer_path.is_file():
            tokenizer_path = ckpt.parent.parent / "tokenizer.json"  # checkpoints/step-N/ -> run dir
        tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise KimbhoError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model was built for {model.config.vocab_size}"
        )
    return model.to(device).eval(), tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise KimbhoError(f"{path} is missing or not valid JSON") from None
    if not isinstance(value, dict):
        raise KimbhoError(f"{path} does not hold a JSON object")
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
