"""`load(MODEL)`: a model and its tokenizer from a run directory, a checkpoint directory or a
Hugging Face directory, on the device and in the precision asked for, checked before anything
large is built."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .config import KimbhoConfig
from .data.tokenizer import Tokenizer
from .device import pick_device, pick_inference_dtype
from .errors import KimbhoError
from .model import KimbhoV1Model
from .storage.checkpoints import (
    ADAPTER_CONFIG,
    CorruptCheckpoint,
    _reason,
    list_checkpoints,
    read_model_config,
    read_weights,
    verify,
)
from .storage.files import read_mapping, sha256_of_file

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # HF's and Kimbho's names


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer.json file, or the tokenizer of a MODEL (run, checkpoint or Hugging Face directory)."""
    if Path(path).is_file():
        return Tokenizer.from_file(path)
    ckpt = resolve_checkpoint(path)
    tokenizer_path = ckpt / "tokenizer.json"
    if not tokenizer_path.is_file():
        tokenizer_path = ckpt.parent.parent / "tokenizer.json"  # checkpoints/step-N/ -> run dir
    return Tokenizer.from_file(tokenizer_path)


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
    `dtype` is the weights' precision, `auto|fp32|bf16|int8` (see `device.pick_inference_dtype`:
    auto keeps the stored precision where the device computes in it natively; int8 quantizes the
    linear layers' weights, `model/quantize.py`, and computes in fp32). A LoRA run loads
    as its base with the adapters merged in, once the base is checked to be the one they adapt."""
    target = device if isinstance(device, torch.device) else pick_device(device)
    ckpt = resolve_checkpoint(path)
    config_values = read_mapping(ckpt / "config.json", CorruptCheckpoint)
    if (ckpt / ADAPTER_CONFIG).is_file():
        model, tokenizer, stored = _load_adapted(ckpt)
    elif config_values.get("format") != "kimbho":
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
        tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise KimbhoError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model was built for {model.config.vocab_size}"
        )
    weights_dtype = pick_inference_dtype("fp32" if dtype == "int8" else dtype, stored, target)
    model.to(target)
    for param in model.parameters():  # parameters only: the rotary tables stay fp32
        param.data = param.data.to(weights_dtype)
    if dtype == "int8":
        from .model.quantize import quantize_int8

        quantize_int8(model)
    return model.eval(), tokenizer


def _load_adapted(ckpt: Path) -> tuple[KimbhoV1Model, Tokenizer, torch.dtype]:
    """A LoRA checkpoint: its base, checked, with the adapters merged in."""
    from .model import lora

    verify(ckpt)
    adapter = read_adapter_config(ckpt)
    base_path = adapter["base"]["path"]
    check_base(ckpt, adapter["base"], base_identity(base_path) if Path(base_path).exists() else None)
    model, tokenizer = load(base_path, dtype="fp32")
    lora.add_adapters(model, adapter["rank"], adapter["alpha"])
    model.load_state_dict(read_weights(ckpt, model), strict=False)  # the base's tensors are loaded
    lora.merge_adapters(model)
    return model, tokenizer, torch.float32


def read_adapter_config(ckpt: Path) -> dict[str, Any]:
    """A LoRA checkpoint's adapter.json: rank, alpha and the base's identity."""
    path = ckpt / ADAPTER_CONFIG
    values = read_mapping(path, CorruptCheckpoint)
    base = values.get("base")
    if not (
        isinstance(values.get("rank"), int)
        and isinstance(values.get("alpha"), (int, float))
        and isinstance(base, dict)
        and {"path", "sha256"} <= set(base)
    ):
        raise CorruptCheckpoint(f"{path} does not hold a LoRA rank, alpha and base")
    return values


def base_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """What a LoRA run records of the model it adapts: the checkpoint directory it resolves to
    and the SHA-256 of its weights (of each weight file, hashed together, for a sharded one)."""
    ckpt = resolve_checkpoint(path).resolve()
    if (ckpt / ADAPTER_CONFIG).is_file():
        raise KimbhoError(f"{path} is itself a LoRA run; export it merged (kimbho export hf) and adapt that")
    files = sorted(
        f for f in ckpt.iterdir() if f.suffix == ".safetensors" and not f.name.startswith("adapter")
    )
    if not files:
        raise KimbhoError(f"{ckpt} holds no .safetensors weights to adapt")
    digests = [sha256_of_file(f) for f in files]
    combined = digests[0] if len(files) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()
    return {"path": str(ckpt), "sha256": combined}


def check_base(adapted: Path, recorded: dict[str, str], found: dict[str, str] | None) -> None:
    """Refuse adapters over a base other than theirs, naming both."""
    if found is None:
        raise KimbhoError(
            f"{adapted} holds LoRA adapters of {recorded['path']}, which no longer exists; "
            f"put that base back, or load a merged export (kimbho export hf)"
        )
    if found["sha256"] != recorded["sha256"]:
        raise KimbhoError(
            f"{adapted} holds LoRA adapters of {recorded['path']} (weights sha256 {recorded['sha256'][:12]}...), "
            f"but {found['path']} now has weights sha256 {found['sha256'][:12]}...: a different base; "
            f"adapters only fit the base they were trained on"
        )


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
