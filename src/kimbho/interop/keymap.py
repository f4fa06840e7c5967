"""What the format adapters share: key tables with a `{i}` per layer, the fused matrices taken
apart, and the special tokens as other runtimes name them. Each adapter (`hf.py`, `gguf.py`)
holds its own format's table: `_RENAMES` (one Kimbho tensor, one tensor there) and `_FUSED` (one
Kimbho tensor, the tensors stacked in it there)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import KimbhoConfig
from ..data.tokenizer import Tokenizer

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")  # imported tokenizers; Kimbho's starts with end-of-text


def expand_layers(table: dict[str, Any], config: KimbhoConfig) -> list[tuple[str, Any]]:
    """A key table (`{i}` = layer) with every layer filled in: [(kimbho_name, other_name(s))]."""
    pairs = []
    for kimbho_name, other in table.items():
        for i in range(config.num_blocks) if "{i}" in kimbho_name else [0]:
            names = tuple(n.format(i=i) for n in other) if isinstance(other, tuple) else other.format(i=i)
            pairs.append((kimbho_name.format(i=i), names))
    return pairs


def split_fused(kimbho_name: str, tensor: torch.Tensor, config: KimbhoConfig) -> list[torch.Tensor]:
    """The parts of a fused matrix (q, k, v or gate, up), each its own copy so files can hold them."""
    if kimbho_name.endswith("qkv.weight"):
        kv = config.num_kv_heads * config.head_dim
        sizes = [config.num_heads * config.head_dim, kv, kv]
    else:
        assert config.mlp_hidden is not None
        sizes = [config.mlp_hidden, config.mlp_hidden]
    return [part.clone() for part in tensor.split(sizes, dim=0)]


def special_tokens(tokenizer: Tokenizer) -> dict[str, tuple[str, int]]:
    """{"bos" | "eos" | "pad": (token text, id)} for the tokens the tokenizer has. Kimbho's own
    tokenizers begin documents with end-of-text (as GPT-2 does), so it is also the BOS."""
    found: dict[str, tuple[str, int]] = {}
    for name in _BOS_NAMES:
        bos_id = tokenizer.token_to_id(name)
        if bos_id is not None:
            found["bos"] = (name, bos_id)
            break
    for role, token_id in (("eos", tokenizer.eot_id), ("pad", tokenizer.pad_id)):
        text = tokenizer.inner.id_to_token(token_id) if token_id is not None else None
        if token_id is not None and text is not None:
            found[role] = (text, token_id)
    if "bos" not in found and "eos" in found:
        found["bos"] = found["eos"]
    return dict(sorted(found.items()))
