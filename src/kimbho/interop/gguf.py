"""Kimbho -> GGUF (llama.cpp's single-file format): the whole key map, the RoPE layout change,
and the tokenizer as llama.cpp reads it. Export with `export_gguf`; reading GGUF back is the
tests' business (tests/test_interop_gguf.py inverts the map to prove the export lossless).

llama.cpp runs the "llama" architecture with the rotary embedding of the original Llama code:
dimensions (2j, 2j+1) of a head form a rotated pair. Kimbho (like Hugging Face) rotates the pair
(j, j + head_dim/2). Permuting the output rows of the q and k projections head by head turns one
into the other: q.k is a sum over dimensions, so reordering both alike changes nothing else, and
the interleaved rotation of the permuted rows is exactly the rotate-half rotation of the original.

The tokenizer goes in as GPT-2-style byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the
`gpt-2` pre-tokenizer, whose split is the GPT-2 regex that Kimbho's tokenizer uses. Special tokens
are CONTROL tokens, which llama.cpp (like Kimbho) never makes from text unless asked to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import KimbhoConfig
from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError
from ..model import KimbhoV1Model
from ..storage.staging import staged_file
from .keymap import expand_layers, special_tokens, split_fused

# Kimbho name -> GGUF name for every tensor that maps one to one; {i} is the layer.
_RENAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "head.weight": "output.weight",
    "blocks.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "blocks.{i}.attn.out.weight": "blk.{i}.attn_output.weight",
    "blocks.{i}.mlp_norm.weight": "blk.{i}.ffn_norm.weight",
    "blocks.{i}.mlp.down.weight": "blk.{i}.ffn_down.weight",
}
# Kimbho fused tensor -> the GGUF tensors stacked in it, in order.
_FUSED = {
    "blocks.{i}.attn.qkv.weight": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "blocks.{i}.mlp.gate_up.weight": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
}
DTYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32  # values per q8_0 block: a row must hold whole blocks


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half to interleaved pairs, head by head:
    row j of a head goes to 2j and row j + head_dim/2 to 2j + 1."""
    out_dim, in_dim = weight.shape
    half = out_dim // heads // 2
    return weight.reshape(heads, 2, half, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_gguf(state: dict[str, torch.Tensor], config: KimbhoConfig) -> dict[str, torch.Tensor]:
    """Kimbho state dict -> GGUF tensors, q/k in llama.cpp's RoPE layout (a tied model has no
    `output.weight`: llama.cpp then uses `token_embd.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, gguf_name in expand_layers(_RENAMES, config):
        if not (name == "head.weight" and config.tie_embeddings):
            out[gguf_name] = state[name]
    for name, gguf_names in expand_layers(_FUSED, config):
        for gguf_name, part in zip(gguf_names, split_fused(name, state[name], config), strict=True):
            out[gguf_name] = part
    for i in range(config.num_blocks):
        out[f"blk.{i}.attn_q.weight"] = interleave_rope(out[f"blk.{i}.attn_q.weight"], config.num_heads)
        out[f"blk.{i}.attn_k.weight"] = interleave_rope(out[f"blk.{i}.attn_k.weight"], config.num_kv_heads)
    return out


def export_gguf(
    model: KimbhoV1Model,
    tokenizer: Tokenizer,
    out: str | Path,
    dtype: str = "f32",
    force: bool = False,
    name: str = "kimbho",
    chat_template: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp loads as a "llama" model.
    `dtype`: f32, f16 or q8_0 for the matrices (norm gains stay f32, as llama.cpp requires; a
    matrix whose rows do not split into q8_0 blocks falls back to f16). `chat_template` (Jinja,
    `ChatFormat.jinja`) becomes `tokenizer.chat_template`, which llama.cpp's chat endpoints
    format conversations with. The file appears complete or not at all; an existing one is
    replaced only with `force`."""
    import gguf

    if dtype not in DTYPES:
        raise KimbhoError(f"GGUF dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    config = model.config
    vocab = _vocab(tokenizer, config.vocab_size)  # before any file is touched: it may refuse
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    state = {n: t.detach().to("cpu", torch.float32) for n, t in model.state_dict().items()}
    with staged_file(Path(out), force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.emb_dim)
        writer.add_block_count(config.num_blocks)
        writer.add_feed_forward_length(config.mlp_hidden)  # type: ignore[arg-type]
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_base)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        specials = special_tokens(tokenizer)
        for role, add in (
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("pad", writer.add_pad_token_id),
        ):
            if role in specials:
                add(specials[role][1])
        # Kimbho's encode adds no special tokens; llama.cpp should not either.
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for gguf_name, tensor in to_gguf(state, config).items():
            data, raw_dtype = _encode(tensor.numpy(), dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def _encode(tensor: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    kind = gguf.GGMLQuantizationType
    tensor = np.ascontiguousarray(tensor)
    if tensor.ndim == 1 or dtype == "f32":
        return tensor, kind.F32
    if dtype == "q8_0" and tensor.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(tensor, kind.Q8_0), kind.Q8_0
    return tensor.astype(np.float16), kind.F16


def _vocab(tokenizer: Tokenizer, vocab_size: int) -> dict[str, list[Any]]:
    """Tokens, token types and merges as llama.cpp's "gpt2" tokenizer reads them, padded with
    unused tokens up to the model's vocabulary size."""
    from gguf import TokenType

    spec = json.loads(tokenizer.to_json())
    bpe, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = (
        bpe.get("type") == "BPE"
        and not bpe.get("byte_fallback")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
    )
    if not byte_level:
        raise KimbhoError(
            "GGUF export needs a byte-level BPE tokenizer with the GPT-2 pre-tokenizer, as `kimbho tokenizer "
            f"train` makes; this one is {bpe.get('type')} with pre_tokenizer {pre.get('type')} and "
            f"normalizer {(spec.get('normalizer') or {}).get('type')}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    entries = [(text, i, TokenType.NORMAL) for text, i in bpe["vocab"].items()]
    entries += [
        (t["content"], t["id"], TokenType.CONTROL if t["special"] else TokenType.USER_DEFINED)
        for t in spec.get("added_tokens", [])
    ]
    for text, i, kind in entries:
        if i >= vocab_size:
            raise KimbhoError(f"token {text!r} has id {i}, outside the model's vocabulary of {vocab_size}")
        tokens[i], types[i] = text, kind
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer); llama.cpp reads "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}
