"""Kimbho V1: a Llama-style decoder-only transformer, read top to bottom like the paper.

Architecture choices and where they come from:

- Token embedding, no absolute positions; position enters only through rotary embeddings
  (RoFormer, Su et al. 2021), in the rotate-half layout of Hugging Face's `LlamaForCausalLM`,
  so export and import are key renames, never a q/k permutation.
- N pre-norm decoder blocks: `x + Attn(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`
  (pre-norm as in GPT-2 and Llama; RMSNorm, Zhang & Sennrich 2019; SwiGLU, Shazeer 2020).
- Grouped-query attention (Ainslie et al. 2023): `num_kv_heads = num_heads // group_size` key/value
  heads, each shared by `group_size` query heads. The key/value cache holds only those heads.
  Attention runs in `F.scaled_dot_product_attention`, whose fused kernels tile the queries in
  blocks that each attend over the full key/value range: what the seed README's "chunked
  queries" aimed at, without materialising the T x T score matrix.
- Final RMSNorm and a linear head, tied to the embedding or not (`tie_embeddings`). Given
  targets, `forward` returns the next-token loss with the head fused into it (`loss.py`), as
  nanoGPT's `forward(idx, targets)` does, so DDP and FSDP wrap the model as it is.

Query, key and value projections are one fused matrix (`attn.qkv`), as are the SwiGLU gate and
up projections (`mlp.gate_up`): one matrix product instead of three (two) per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import KimbhoConfig
from ..errors import KimbhoError
from .linear import Linear
from .loss import linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain; statistics in fp32 for bf16 safety."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (max_len, head_dim), in fp32.

    Rotate-half layout: dimension i and i + head_dim/2 form a pair rotated by angle
    `pos * base^(-2i/head_dim)`, so both halves of the table repeat the same frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles of its positions, cos/sin (T, head_dim)
    or (B, 1, T, head_dim)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Preallocated keys and values of every layer, `(num_blocks, slots, num_kv_heads, max_len, head_dim)`.

    Static shapes, so a decode step allocates nothing and can be compiled (and captured in a CUDA
    graph). The cache keeps no lengths: every call says at which positions its tokens sit, so each
    row (slot) advances on its own, which is what continuous batching needs."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def rows(self, start: int, count: int) -> KVCache:
        """A view of slots [start, start + count): writes through it land in this cache."""
        return KVCache(self.keys[:, start : start + count], self.values[:, start : start + count])

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot dst[i] becomes a copy of slot src[i] (n samples of one prompt, beam reordering)."""
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) of `layer` at `positions` (B, T), each row at its own
        positions; return that layer's keys and values of every position, (B, n_kv, max_len, hd)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1), broadcast against (B, T)
        # The layer as a tensor index too: one write into the whole cache, which a compiled step
        # does in place (a write through the layer's view is compiled as copies of the layer).
        at = torch.full((1,), layer, dtype=torch.long, device=k.device)
        self.keys[at, rows, :, positions] = k.transpose(1, 2)  # indexed: (B, T, n_kv, hd)
        self.values[at, rows, :, positions] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: KimbhoConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = Linear(
            config.emb_dim, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False
        )
        self.out = Linear(self.num_heads * self.head_dim, config.emb_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            assert positions is not None and mask is not None
            k, v = cache.update(layer, k, v, positions)  # (B, n_kv, max_len, hd)
            # Only the first kv_len positions can be visible to any query (the mask says which).
            kv_len = mask.shape[-1]
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, n_kv, kv_len, hd)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # without a cache the queries are causal among themselves
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, q_size))


class SwiGLU(nn.Module):
    def __init__(self, config: KimbhoConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        assert hidden is not None
        self.gate_up = Linear(config.emb_dim, 2 * hidden, bias=False)
        self.down = Linear(hidden, config.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: KimbhoConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.emb_dim, config.norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.mlp_norm = RMSNorm(config.emb_dim, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, positions, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class KimbhoV1Model(nn.Module):
    """The Kimbho V1 decoder. `KimbhoV1Model(config)` or `KimbhoV1Model(vocab_size=..., ...)`.

    `forward(input_ids)` maps (B, T) token ids to (B, T, vocab_size) logits."""

    def __init__(self, config: KimbhoConfig | None = None, **fields: object) -> None:
        super().__init__()
        if config is None:
            config = KimbhoConfig(**fields)  # type: ignore[arg-type]
        elif fields:
            raise TypeError("pass either a KimbhoConfig or its fields as keywords, not both")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=config.pad_idx)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.norm = RMSNorm(config.emb_dim, config.norm_eps)
        self.head = Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # Activation checkpointing: keep only each block's input for backward and recompute the
        # rest (~1/3 more compute for a fraction of the activation memory; for large presets).
        self.checkpoint_activations = False
        # Not persistent: derived from the config, so they stay out of checkpoints.
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_weights(cls, config: KimbhoConfig, state: dict[str, torch.Tensor]) -> KimbhoV1Model:
        """A model holding the tensors of `state` as its parameters: built on the `meta` device
        (nothing allocated or randomly initialised just to be overwritten), then given the
        tensors themselves, as gpt-fast loads. `state` must fit `config` exactly."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        if config.tie_embeddings:
            model.head.weight = model.embed.weight  # assign made two parameters of the one tensor
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
        model.rope_cos, model.rope_sin = cos.to(model.embed.weight.device), sin.to(model.embed.weight.device)
        return model

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices; the projections that write into the residual stream
        scaled by 1/sqrt(2 * num_blocks) (GPT-2) so its variance does not grow with depth;
        unit norm gains; a zero padding embedding."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() == 2:
                scale = (
                    math.sqrt(2 * self.config.num_blocks)
                    if name.endswith(("attn.out.weight", "mlp.down.weight"))
                    else 1
                )
                nn.init.normal_(param, mean=0.0, std=std / scale)
            else:
                nn.init.ones_(param)
        with torch.no_grad():
            self.embed.weight[self.config.pad_idx].zero_()

    def features(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        segments: torch.Tensor | None = None,
        prefixes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, emb_dim), before the head. `segments`: packed
        rows, as for `forward`; `prefixes` (B, T), with them, names for each token one more
        segment it sees (earlier in the row: a query that several continuations share, each
        continuing its positions), or its own segment for none.

        With a cache, token (b, t) sits at position `positions[b, t]`: its key and value are
        stored there and it attends to every cached position up to its own. Rows are independent,
        so each can be at a different length. `kv_len` (default: the cache's length) bounds the
        positions attended to; a shorter one saves work when every row is short.

        Generation's entry point (it applies the head itself); FSDP gathers the weights for it as
        for `forward` (`training/distributed.py`). `forward` calls `_hidden` directly, so one
        training forward pass gathers once."""
        return self._hidden(input_ids, cache, positions, kv_len, segments=segments, prefixes=prefixes)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); see `features` for the cache and positions. Given `targets`
        (B, T) token ids (`model/loss.py`'s IGNORE where nothing is predicted), the cross-entropy
        of predicting them instead (`reduction` `mean` or `sum`), computed without materialising
        the logits.

        Packed rows (several examples in one row, as fine-tuning trains): without a cache,
        `positions` (B, T) restart at 0 for each example and `segments` (B, T) number them; a
        token attends only to earlier tokens of its own segment, so each example computes what
        it would alone."""
        hidden = self._hidden(input_ids, cache, positions, segments=segments)
        if targets is None:
            return self.head(hidden)
        return linear_cross_entropy(hidden, self.head.weight, targets, reduction)

    def _hidden(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        segments: torch.Tensor | None = None,
        prefixes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The body `features` and `forward` share (see both)."""
        if input_ids.dim() != 2:
            raise KimbhoError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        mask = None
        if cache is None:
            if T > self.config.max_seq_len:
                raise KimbhoError(
                    f"sequence of {T} tokens is longer than the model's context of {self.config.max_seq_len}"
                )
            if segments is None:
                cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd)
            else:
                if (
                    positions is None
                    or positions.shape != input_ids.shape
                    or segments.shape != input_ids.shape
                ):
                    raise KimbhoError(
                        "packed rows need positions and segments of input_ids' (batch, seq_len) shape"
                    )
                cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
                # Causal within a segment (and its prefix), blind across the others: (B, 1, T, T).
                causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
                seen = segments[:, :, None] == segments[:, None, :]
                if prefixes is not None:
                    seen |= prefixes[:, :, None] == segments[:, None, :]
                mask = (causal & seen).unsqueeze(1)
        else:
            if positions is None or positions.shape != input_ids.shape:
                raise KimbhoError(
                    "with a cache, pass positions of the same (batch, seq_len) shape as input_ids"
                )
            kv_len = kv_len or cache.max_len
            if not torch.compiler.is_compiling():  # a host sync: checked in eager mode only
                limit = min(self.config.max_seq_len, kv_len)
                if int(positions.max()) >= limit:
                    raise KimbhoError(
                        f"sequence of {int(positions.max()) + 1} tokens is longer than the model's context of {limit}"
                    )
            cos, sin = (
                self.rope_cos[positions].unsqueeze(1),
                self.rope_sin[positions].unsqueeze(1),
            )  # (B, 1, T, hd)
            # Key j is visible to the query at position p when j <= p: causal, and blind to
            # positions of the row not written yet.
            visible = torch.arange(kv_len, device=input_ids.device) <= positions[..., None]  # (B, T, kv_len)
            mask = visible.unsqueeze(1)  # (B, 1, T, kv_len): broadcast over heads
        x = self.embed(input_ids)  # (B, T, emb)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_activations and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cos, sin, None, i, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, positions, mask)
        return self.norm(x)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty key/value cache for `batch_size` sequences (slots) of up to `max_len` tokens."""
        max_len = max_len or self.config.max_seq_len
        weight = self.embed.weight
        shape = (self.config.num_blocks, batch_size, self.config.num_kv_heads, max_len, self.config.head_dim)
        dtype = dtype or weight.dtype
        # empty + zero_, not zeros: on the CPU torch.zeros of a few MB took ~0.5 ms against ~0.03
        # (it seems to take fresh pages from the system; `empty` reuses what was freed), and
        # `generate` makes a cache per call.
        return KVCache(
            torch.empty(shape, dtype=dtype, device=weight.device).zero_(),
            torch.empty(shape, dtype=dtype, device=weight.device).zero_(),
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding=True` leaves out the input embedding table (a lookup,
        not a matrix product) unless it is tied to the head, where it does a product's work."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the matrix products
        plus 12 * layers * emb_dim * seq_len for attention scores and weighted values."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.num_blocks * cfg.emb_dim * seq_len


class DecoderLanguageModel(KimbhoV1Model):
    """The seed README's class, with its positional signature."""

    def __init__(
        self,
        vocab_size: int,
        emb_dim: int,
        num_heads: int,
        num_blocks: int,
        pad_idx: int,
        group_size: int = 4,
        rope_base: float = 10000.0,
        **fields: object,
    ) -> None:
        config = KimbhoConfig(
            vocab_size=vocab_size,
            emb_dim=emb_dim,
            num_heads=num_heads,
            num_blocks=num_blocks,
            pad_idx=pad_idx,
            group_size=group_size,
            rope_base=rope_base,
            **fields,  # type: ignore[arg-type]
        )
        super().__init__(config)
