"""Hugging Face `LlamaForCausalLM` <-> Kimbho: the whole key map in one place.

Kimbho keeps Llama's layout and meanings (rotate-half RoPE, same norms, same head order), so
conversion is a rename plus splitting (or joining) the two fused matrices: `attn.qkv` holds
`q_proj`, `k_proj`, `v_proj` stacked along the output dimension, and `mlp.gate_up` holds
`gate_proj` then `up_proj`. No q/k permutation happens here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import KimbhoConfig
from ..errors import KimbhoError

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


def _layer_names(table: dict[str, Any], config: KimbhoConfig) -> list[tuple[str, Any]]:
    """The table with `{i}` filled in for every layer."""
    pairs = []
    for kimbho_name, hf in table.items():
        for i in range(config.num_blocks) if "{i}" in kimbho_name else [0]:
            hf_names = tuple(n.format(i=i) for n in hf) if isinstance(hf, tuple) else hf.format(i=i)
            pairs.append((kimbho_name.format(i=i), hf_names))
    return pairs


def _split_sizes(kimbho_name: str, config: KimbhoConfig) -> list[int]:
    if kimbho_name.endswith("qkv.weight"):
        kv = config.num_kv_heads * config.head_dim
        return [config.num_heads * config.head_dim, kv, kv]
    assert config.mlp_hidden is not None
    return [config.mlp_hidden, config.mlp_hidden]


def to_hf(state: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """Kimbho state dict -> `LlamaForCausalLM` state dict (tied models carry no `lm_head.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in _layer_names(_RENAMES, config):
        if name == "head.weight" and config.tie_embeddings:
            continue
        out[hf_name] = state[name]
    for name, hf_names in _layer_names(_FUSED, config):
        for hf_name, part in zip(hf_names, state[name].split(_split_sizes(name, config), dim=0), strict=True):
            out[hf_name] = part.contiguous()
    return out


def from_hf(hf_state: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict -> Kimbho state dict, checking every name and shape."""
    state: dict[str, torch.Tensor] = {}

    def take(hf_name: str) -> torch.Tensor:
        if hf_name not in hf_state:
            raise KimbhoError(
                f"Hugging Face weights lack {hf_name}; is this a Llama checkpoint of this config?"
            )
        return hf_state[hf_name]

    for name, hf_name in _layer_names(_RENAMES, config):
        if name == "head.weight" and config.tie_embeddings:
            continue
        state[name] = take(hf_name)
    for name, hf_names in _layer_names(_FUSED, config):
        state[name] = torch.cat([take(n) for n in hf_names], dim=0)
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def config_to_hf(config: KimbhoConfig, **special_ids: int | None) -> dict[str, Any]:
    """`LlamaConfig` fields with the same meaning as the Kimbho config."""
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
    archs = hf.get("architectures") or [hf.get("model_type", "unknown")]
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
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % kv_heads:
        raise KimbhoError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise KimbhoError(
            f"head_dim={head_dim} x {heads} heads != hidden_size={hf['hidden_size']}; not supported"
        )
    pad = hf.get("pad_token_id")
    return KimbhoConfig(
        vocab_size=hf["vocab_size"],
        emb_dim=hf["hidden_size"],
        num_heads=heads,
        num_blocks=hf["num_hidden_layers"],
        group_size=heads // kv_heads,
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        pad_idx=pad if isinstance(pad, int) and 0 <= pad < hf["vocab_size"] else 0,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        mlp_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
