"""Checkpoints you can trust: complete or absent, verified on load, loadable without running code.

    checkpoints/step-00000100/
        model.safetensors   weights of the bare model (no compile/DDP prefixes), whole even when
                            training sharded them over processes (FSDP)
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

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import KimbhoConfig, RunConfig
from .device import pick_device, pick_inference_dtype
from .errors import KimbhoError
from .model import KimbhoV1Model
from .tokenizer import Tokenizer

log = logging.getLogger("kimbho")

CHECKPOINTS = "checkpoints"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
_SET_ASIDE_PREFIX = "unusable-"
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # HF's and Kimbho's names


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
    **manifest_extra: Any,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically, then drop all but the newest `keep_last`.

    `weights` is the bare model's full state dict (`model.state_dict()`, or gathered from the
    processes, see `distributed.full_weights`); `run_config.model` is its config. `name` writes
    `checkpoints/<name>/` instead of `step-N/`, outside retention (the best checkpoint);
    `trainer_state=None` writes a weights-only checkpoint. A failed write (disk full)
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
        writing = "model.safetensors"
        _save_weights(weights, run_config.model, tmp / writing)
        writing = "config.json"
        (tmp / writing).write_text(json.dumps({"format": "kimbho", **run_config.model.to_dict()}, indent=2))
        writing = "tokenizer.json"
        tokenizer.save(tmp / writing)
        writing = "run.yaml"
        run_config.save(tmp / writing)
        if trainer_state is not None:
            writing = "trainer.pt"
            # Through a Python file, so a failed write keeps its OSError (as the RuntimeError's context).
            with open(tmp / writing, "wb") as f:
                torch.save(trainer_state, f)
        writing = "manifest.json"
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / writing).write_text(json.dumps({"step": step, **manifest_extra, "files": files}, indent=2))
        writing = ""
        for f in tmp.iterdir():
            _fsync(f)
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
        if _sha256(path) != digest:
            raise CorruptCheckpoint(
                f"checkpoint file {path} is corrupt (its SHA-256 does not match manifest.json)"
            )
    return manifest


def read_model_config(ckpt: Path) -> KimbhoConfig:
    values = _read_json(ckpt / "config.json")
    values.pop("format", None)
    return KimbhoConfig.from_dict(values)


def read_weights(ckpt: Path, model: KimbhoV1Model) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, checked against `model`'s names and shapes (a sharded
    model's parameters report their full shapes)."""
    path = ckpt / "model.safetensors"
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CorruptCheckpoint(f"cannot read weights {path}: {_reason(e)}") from None
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


def saved_train_config(ckpt: Path) -> dict[str, Any]:
    """The `train:` section of the run config a checkpoint was made with."""
    return _read_yaml(ckpt / "run.yaml").get("train") or {}


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


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str = "auto"
) -> tuple[KimbhoV1Model, Tokenizer]:
    """`(model, tokenizer)` from a run directory, a checkpoint directory or a local Hugging Face
    Llama directory, in eval mode. `device` is `auto|cpu|cuda|cuda:N|mps` (or a torch.device);
    `dtype` is the weights' precision, `auto|fp32|bf16` (see `device.pick_inference_dtype`:
    auto keeps the stored precision where the device computes in it natively)."""
    target = device if isinstance(device, torch.device) else pick_device(device)
    ckpt = resolve_checkpoint(path)
    config_values = _read_json(ckpt / "config.json")
    if config_values.get("format") != "kimbho":
        from .interop.hf import load_hf_directory, weight_files

        model, tokenizer = load_hf_directory(ckpt)
        stored = _stored_dtype(ckpt / weight_files(ckpt)[0])
    else:
        verify(ckpt)  # a checkpoint without its manifest (written last) may be half-written
        config = read_model_config(ckpt)
        check_layer_count(config, weight_shapes([ckpt / "model.safetensors"]), ckpt / "config.json")
        with torch.device("meta"):  # the names and shapes to check the file against, unallocated
            expected = KimbhoV1Model(config)
        model = KimbhoV1Model.from_weights(config, read_weights(ckpt, expected))
        stored = _stored_dtype(ckpt / "model.safetensors")
        tokenizer_path = ckpt / "tokenizer.json"
        if not tokenizer_path.is_file():
            tokenizer_path = ckpt.parent.parent / "tokenizer.json"  # checkpoints/step-N/ -> run dir
        tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise KimbhoError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model was built for {model.config.vocab_size}"
        )
    weights_dtype = pick_inference_dtype(dtype, stored, target)
    model.to(target)
    for param in model.parameters():  # parameters only: the rotary tables stay fp32
        param.data = param.data.to(weights_dtype)
    return model.eval(), tokenizer


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in safetensors `files`, from their headers alone."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except FileNotFoundError:
            raise CorruptCheckpoint(f"weight file {file} is missing") from None
        except (OSError, SafetensorError) as e:
            raise CorruptCheckpoint(f"cannot read weights {file}: {_reason(e)}") from None
    return shapes


def check_layer_count(config: KimbhoConfig, names: Iterable[str], config_file: Path) -> None:
    """Refuse a config that declares more layers than the weights hold, before anything is built
    for it (a million layers would take minutes to build even as shapes, and terabytes as weights)."""
    held = {int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))}
    if config.num_blocks > len(held):
        raise KimbhoError(
            f"{config_file} declares {config.num_blocks:,} layers, but the weights hold {len(held):,}: "
            f"the config does not describe these weights"
        )


def _stored_dtype(weights: Path) -> torch.dtype:
    """The floating-point dtype a safetensors file stores its matrices in (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            dtype = f.get_slice(name).get_dtype()
            if dtype in ("BF16", "F16", "F32"):
                return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    return torch.float32


def _describe_split(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "absent"
    return f"{fingerprint['tokens']:,} tokens with sha256 {fingerprint['sha256'][:12]}..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptCheckpoint(f"{path} is missing or not valid JSON") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise CorruptCheckpoint(f"{path} is nested too deeply to be a model config") from None
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"{path} does not hold a JSON object")
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise CorruptCheckpoint(f"{path} is missing or not valid YAML") from None
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"{path} does not hold a YAML mapping")
    return value


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
