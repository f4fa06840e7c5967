"""Hugging Face `LlamaForCausalLM` <-> Kimbho: the whole key map in one place, and the directory
format around it (export with `export_hf`, import with `load_hf_directory`).

Kimbho keeps Llama's layout and meanings (rotate-half RoPE, same norms, same head order), so
conversion is a rename plus splitting (or joining) the two fused matrices: `attn.qkv` holds
`q_proj`, `k_proj`, `v_proj` stacked along the output dimension, and `mlp.gate_up` holds
`gate_proj` then `up_proj`. No q/k permutation happens here.

An exported directory loads with nothing but `transformers` installed:

    OUT_DIR/
        config.json                     LlamaConfig (architectures: LlamaForCausalLM)
        model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json                  the model's own byte-level BPE, unchanged
        tokenizer_config.json           special tokens and the chat template the model was trained in
        generation_config.json          special ids and `kimbho generate`'s sampling defaults

A LoRA run exports merged (its adapters folded into the base), or with `export_peft_adapter` as
a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that
`peft.PeftModel.from_pretrained` puts on the exported base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import KimbhoConfig
from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError
from ..inference.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..model import KimbhoV1Model
from ..storage.files import read_mapping
from ..storage.staging import staged_directory
from .keymap import expand_layers, special_tokens, split_fused

# Kimbho name -> Hugging Face name for every tensor that maps one to one; {i} is the layer.
_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Kimbho fused tensor -> the Hugging Face tensors stacked in it, in order.
_FUSED = {
    "blocks.{i}.attn.qkv.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "blocks.{i}.mlp.gate_up.weight": (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    ),
}
# Tensors some Llama checkpoints carry that hold nothing Kimbho needs (RoPE tables it recomputes).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", the size most Hub models are split at


def to_hf(state: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """Kimbho state dict -> `LlamaForCausalLM` state dict (tied models carry no `lm_head.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in expand_layers(_RENAMES, config):
        if name == "head.weight" and config.tie_embeddings:
            continue
        out[hf_name] = state[name]
    for name, hf_names in expand_layers(_FUSED, config):
        for hf_name, part in zip(hf_names, split_fused(name, state[name], config), strict=True):
            out[hf_name] = part
    return out


def from_hf(hf_state: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict -> Kimbho state dict, refusing missing, unexpected or misshapen
    tensors with a message naming the first one."""
    _check_hf_state(hf_state, config)
    state: dict[str, torch.Tensor] = {}
    for name, hf_name in expand_layers(_RENAMES, config):
        if not (name == "head.weight" and config.tie_embeddings):
            state[name] = hf_state[hf_name]
    for name, hf_names in expand_layers(_FUSED, config):
        state[name] = torch.cat([hf_state[n] for n in hf_names], dim=0)
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def _check_hf_state(hf_state: dict[str, torch.Tensor], config: KimbhoConfig) -> None:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = {n: tuple(t.shape) for n, t in to_hf(KimbhoV1Model(config).state_dict(), config).items()}
    missing = [n for n in expected if n not in hf_state]
    if missing:
        raise KimbhoError(
            f"the weights lack {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; they do not belong to a Llama model of this config.json"
        )
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()
    extra = [n for n in hf_state if n not in expected and n not in tied_head and not _IGNORED.match(n)]
    if extra:
        raise KimbhoError(
            f"the weights hold {extra[0]}, which a Llama model of this config.json does not have; "
            f"Kimbho would have to drop it"
        )
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise KimbhoError(
                f"weight {name} has shape {tuple(hf_state[name].shape)}, but config.json implies {shape}"
            )


def config_to_hf(config: KimbhoConfig, **special_ids: int | None) -> dict[str, Any]:
    """`LlamaConfig` fields with the same meaning as the Kimbho config. `rope_parameters` is how
    transformers 5 reads the RoPE base; `rope_theta` is kept for older readers (transformers 4,
    llama.cpp's converter)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.emb_dim,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.num_blocks,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "pad_token_id": config.pad_idx,
        **special_ids,
    }


def config_from_hf(hf: dict[str, Any]) -> KimbhoConfig:
    """A Kimbho config from a Hugging Face `config.json` of a Llama model; other architectures
    and Llama variants Kimbho does not implement are refused by name."""
    if not hf.get("architectures") and not hf.get("model_type"):
        raise KimbhoError(
            "config.json names no architecture or model_type: this is neither a Kimbho checkpoint "
            "nor a Hugging Face model directory"
        )
    archs = hf.get("architectures") or [hf["model_type"]]
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise KimbhoError(
            f"architecture {archs[0]} is not supported; Kimbho loads Llama-architecture models only"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise KimbhoError(f"this Llama model uses {flag}=true, which Kimbho does not implement")
    if hf.get("hidden_act", "silu") != "silu":
        raise KimbhoError(
            f"this Llama model uses hidden_act={hf['hidden_act']}; Kimbho implements silu (SwiGLU)"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise KimbhoError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    try:
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        hidden, vocab = hf["hidden_size"], hf["vocab_size"]
        blocks, mlp_hidden = hf["num_hidden_layers"], hf["intermediate_size"]
    except KeyError as e:
        raise KimbhoError(f"config.json of this Llama model lacks {e.args[0]}") from None
    if heads % kv_heads:
        raise KimbhoError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise KimbhoError(f"head_dim={head_dim} x {heads} heads != hidden_size={hidden}; not supported")
    pad = hf.get("pad_token_id")
    return KimbhoConfig(
        vocab_size=vocab,
        emb_dim=hidden,
        num_heads=heads,
        num_blocks=blocks,
        group_size=heads // kv_heads,
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        pad_idx=pad if isinstance(pad, int) and 0 <= pad < vocab else 0,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        mlp_hidden=mlp_hidden,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


# --- directories ------------------------------------------------------------------------------


def export_hf(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    force: bool = False,
    max_shard_bytes: int | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face Llama directory that
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline.
    Weights go in shards of at most `max_shard_bytes` (default 5GB) when they are larger.
    `chat_template` (Jinja, see `ChatFormat.jinja`) makes `apply_chat_template` give the ids
    Kimbho's chat format gives. The directory appears complete or not at all; an existing
    non-empty one needs `force`."""
    config = model.config
    specials = special_tokens(tokenizer)
    ids = {f"{role}_token_id": token_id for role, (_, token_id) in specials.items()}
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    with staged_directory(Path(out_dir), force) as tmp:
        save_weights(to_hf(state, config), tmp, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        _write_json(tmp / "config.json", {**config_to_hf(config, **ids), "dtype": dtype})
        _write_json(
            tmp / "generation_config.json",
            # The sampling defaults of `kimbho generate`, so both sample alike out of the box.
            {**ids, "do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P},
        )
        tokenizer.save(tmp / "tokenizer.json")
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **{f"{role}_token": text for role, (text, _) in specials.items()},
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,  # decode returns exactly the text
                "model_max_length": config.max_seq_len,
                **({"chat_template": chat_template} if chat_template is not None else {}),
            },
        )
    return Path(out_dir)


# The projections LoRA adapts, as PEFT names them (`target_modules`).
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def export_peft_adapter(
    adapters: dict[str, torch.Tensor],
    config: KimbhoConfig,
    rank: int,
    alpha: float,
    base: str,
    out_dir: str | Path,
    force: bool = False,
) -> Path:
    """Write a LoRA run's adapters (`model/lora.py` names) as a PEFT adapter directory for the
    Hugging Face export of its base (`base`: recorded as base_model_name_or_path). The stacked
    parts of the fused projections become one adapter per Llama projection."""
    from safetensors.torch import save_file

    peft_state: dict[str, torch.Tensor] = {}
    tables = [(n, (hf,)) for n, hf in expand_layers(_RENAMES, config)] + expand_layers(_FUSED, config)
    for name, hf_names in tables:
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A" not in adapters:
            continue  # embeddings, norms and head have none
        a_parts = adapters[f"{prefix}.lora_A"].split(rank)
        b_parts = (
            split_fused(name, adapters[f"{prefix}.lora_B"], config)
            if len(hf_names) > 1
            else [adapters[f"{prefix}.lora_B"]]
        )
        for hf_name, a, b in zip(hf_names, a_parts, b_parts, strict=True):
            module = "base_model.model." + hf_name.removesuffix(".weight")
            peft_state[f"{module}.lora_A.weight"] = a.contiguous()
            peft_state[f"{module}.lora_B.weight"] = b.contiguous()
    with staged_directory(Path(out_dir), force) as tmp:
        save_file(peft_state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(
            tmp / "adapter_config.json",
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base,
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": list(PEFT_TARGETS),
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "inference_mode": True,
            },
        )
    return Path(out_dir)


def save_weights(hf_state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` (a larger single tensor gets a
    shard of its own) with the `model.safetensors.index.json` that maps each tensor to its shard."""
    from safetensors.torch import save_file

    names = sorted(hf_state, key=_natural_key)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in names:
        size = hf_state[name].numel() * hf_state[name].element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file({n: hf_state[n].contiguous() for n in names}, str(out_dir / WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: hf_state[n].contiguous() for n in shard}, str(out_dir / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    _write_json(out_dir / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def load_hf_directory(path: str | Path) -> tuple[KimbhoV1Model, Tokenizer]:
    """`(model, tokenizer)` from a local Hugging Face directory of a Llama model: config.json,
    safetensors weights (one file or shards with their index) and tokenizer.json. Weights are
    loaded as fp32 whatever their stored dtype (`checkpoint.load` converts them for --dtype)."""
    path = Path(path)
    values = read_mapping(path / "config.json")
    try:
        config = config_from_hf(values)
    except KimbhoError as e:
        raise KimbhoError(f"{path}: {e}") from None
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise KimbhoError(
            f"{path} has no tokenizer.json; Kimbho needs the Hugging Face tokenizers file (save one with "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
        )
    tokenizer = Tokenizer.from_file(tokenizer_file)
    from ..loading import check_layer_count, weight_shapes

    check_layer_count(config, weight_shapes([path / f for f in weight_files(path)]), path / "config.json")
    weights = read_weights(path)  # then from_hf checks every shape against the config
    try:
        state = from_hf(weights, config)
    except KimbhoError as e:
        raise KimbhoError(f"{path}: {e}") from None
    # fp32 parameters whatever the stored dtype; `checkpoint.load` converts them for --dtype.
    model = KimbhoV1Model.from_weights(config, {name: t.float() for name, t in state.items()})
    return model, tokenizer


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a Hugging Face directory: the shards its index names, or
    model.safetensors. A shard must be a file inside the directory."""
    if (path / WEIGHTS_INDEX).is_file():
        weight_map = read_mapping(path / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise KimbhoError(f"{path / WEIGHTS_INDEX} has no weight_map")
        files = sorted({str(f) for f in weight_map.values()})
        root = path.resolve()
        outside = [f for f in files if (root / f).resolve().parent != root]
        if outside:
            raise KimbhoError(
                f"{path / WEIGHTS_INDEX} names weight file {outside[0]!r} outside {path}; shards must "
                f"be files of the model directory itself"
            )
        return files
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    if any(path.glob("pytorch_model*.bin")):
        raise KimbhoError(
            f"{path} holds PyTorch pickle weights (pytorch_model.bin) only; Kimbho reads safetensors, which "
            f"cannot run code: convert with AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)"
        )
    raise KimbhoError(f"{path} has no {WEIGHTS} or {WEIGHTS_INDEX}: it holds no model weights")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors weights, sharded or not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(str(path / file)))
        except FileNotFoundError:
            raise KimbhoError(f"weight shard {path / file} named in {WEIGHTS_INDEX} is missing") from None
        except (OSError, SafetensorError) as e:
            raise KimbhoError(f"cannot read weights {path / file}: {e}") from None
    return state


def _natural_key(name: str) -> list[Any]:
    """Sort layer 2 before layer 10, so shards hold consecutive layers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
