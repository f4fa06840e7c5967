"""Fast matrix products over a few rows on the CPU, for the compiled decode step.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so its
speed is how fast the weights are read. MKL's matrix-vector product reads them on one thread,
whatever `torch.get_num_threads()` says, at a fraction of what the memory delivers. Written as multiply-and-sum with the output features outermost, the same
product becomes an Inductor reduction: one vectorised pass over the weights, split across all
threads, that uses each weight row for every input row while the row is in cache, at several
times MKL's speed for one row (docs/generation.md, Decode speed). Each further row costs more
arithmetic, so from some number of rows (`FEW_ROWS`) MKL's product is left as it is.

`SmallMatmulPass` makes that rewrite in the compiled graph, after autograd and decompositions,
where every linear layer is an `aten.mm`. Its input rows are materialised first: otherwise
Inductor would recompute the normalisation or SiLU that produced them once per output feature.
It also writes single-query attention (one new token per sequence) as plain arithmetic: a call
to PyTorch's fused attention kernel per layer cost more than the few products it does, and
splits the step into separate kernels. Outside a compiled CPU decode step nothing changes: eager
mode keeps MKL and the fused attention, bit for bit.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..device import cpu_vendor

aten = torch.ops.aten

# Up to this many rows the rewrite pays, timing a whole compiled decode step of `small` (the
# measurements are in docs/generation.md, Decode speed): on a Zen 3 (AVX2) MKL's product was as
# fast from ~8 rows; on a Zen 5 (AVX512), where MKL is slower, batch-8 `generate` made 2,575
# tokens/s with the rewrite at 8 rows against 922 with MKL's. On Intel CPUs MKL takes its fast
# paths: see `few_rows`.
FEW_ROWS = 8
# The sum over K runs as SPLIT sums of K/SPLIT terms. Each sum is one chain of vector additions,
# so shorter chains that the compiler unrolls overlap; and an int8 weight's four bytes per word
# (`model.quantize`) become one term each, their shifts constant in the inner loop. Measured on
# the `small` decode step (AVX2): int8 3.27 -> 2.53 ms, fp32 unchanged (it waits on memory).
SPLIT = 4


def few_rows(int8: bool) -> int:
    """Up to how many rows the rewrite replaces a product on this CPU. int8 weights need it
    (MKL's product would read them dequantized to fp32, every step): `FEW_ROWS`. Float weights
    on an Intel CPU: 1 row only, where both run at the memory's speed (1.14-1.15 ms a `small`
    fp32 step); from 2 rows MKL's product (and oneDNN's, bf16) was 1.7-2.8x faster there
    (a 2-core Sapphire Rapids: fp32 2 rows 1.18 against 2.02 ms, 8 rows 3.0 against 7.0; bf16
    8 rows 2.2 against 6.1). Elsewhere `FEW_ROWS`."""
    return FEW_ROWS if int8 or cpu_vendor() != "GenuineIntel" else 1


class SmallMatmulPass(CustomGraphPass):
    """An Inductor post-grad pass: each CPU `mm` of at most `rows` rows (`few_rows`) becomes
    multiply-and-sum over materialised rows, and each single-query fused attention becomes
    plain arithmetic. Pass it as
    `torch.compile(fn, options={"post_grad_custom_post_pass": SmallMatmulPass()})`."""

    def __init__(self, rows: int = FEW_ROWS) -> None:
        self.rows = rows

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.target is aten.mm.default:
                _rewrite_matmul(graph, node, self.rows)
            elif node.target is aten._scaled_dot_product_flash_attention_for_cpu.default:
                _rewrite_attention(graph, node)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__,)), self.rows)


def _rewrite_matmul(graph: torch.fx.Graph, node: torch.fx.Node, few_rows: int) -> None:
    """rows (M, K) @ weight.T as a sum over (SPLIT, K/SPLIT) of weight (N, 1, SPLIT, K/SPLIT) *
    rows (M, SPLIT, K/SPLIT), for M <= few_rows."""
    rows, weight_t = (_node(a) for a in node.args)  # (M, K) and (K, N): the weight transposed
    val = rows.meta["val"]
    if val.device.type != "cpu" or val.shape[0] > few_rows:
        return
    M, K = val.shape
    G = SPLIT if K % SPLIT == 0 else 1
    with graph.inserting_before(node):
        weight = _call(graph, aten.permute.default, weight_t, [1, 0])  # (N, K)
        weight = _call(graph, aten.reshape.default, weight, [-1, 1, G, K // G])  # (N, 1, G, K/G)
        split_rows = _call(graph, aten.reshape.default, rows, [M, G, K // G])
        products = _call(graph, aten.mul.Tensor, weight, split_rows)  # (N, M, G, K/G)
        sums = _call(graph, aten.sum.dim_IntList, products, [-2, -1])  # (N, M)
        out = _call(graph, aten.permute.default, sums, [1, 0])  # (M, N)
        # mm's own (contiguous) layout, which the nodes after it were traced with.
        out = _call(graph, aten.clone.default, out, memory_format=torch.contiguous_format)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    rows.meta["inductor_realize_to_strides"] = True  # stored once, not recomputed per feature


def _rewrite_attention(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Attention of one query per sequence over the cached keys, grouped-query heads included:
    query head h reads key/value head h // group, as `enable_gqa` does."""
    query, key, value = (_node(a) for a in node.args[:3])
    dropout = node.args[3] if len(node.args) > 3 else 0.0
    causal = node.args[4] if len(node.args) > 4 else False
    mask = _node(node.kwargs["attn_mask"]) if node.kwargs.get("attn_mask") is not None else None
    scale = node.kwargs.get("scale")
    q, k = query.meta["val"], key.meta["val"]
    B, H, T, D = q.shape
    KV = k.shape[1]
    shared_mask = mask is None or mask.meta["val"].shape[1:3] == (1, 1)  # one mask for all heads
    if q.device.type != "cpu" or T != 1 or dropout or causal or H % KV or not shared_mask:
        return
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return  # something reads the log-sum-exp: leave the fused kernel
    scale = scale if scale is not None else D**-0.5
    with graph.inserting_before(node):
        grouped = _call(graph, aten.reshape.default, query, [B, KV, H // KV, 1, D])  # (B, KV, G, 1, D)
        keys = _call(graph, aten.unsqueeze.default, key, 2)  # (B, KV, 1, L, D)
        scores = _call(graph, aten.sum.dim_IntList, _call(graph, aten.mul.Tensor, grouped, keys), [-1])
        scores = _call(graph, aten.mul.Tensor, scores, scale)  # (B, KV, G, L)
        if mask is not None:
            visible = mask  # (B or 1, 1, 1, L): broadcasts against the scores
            if mask.meta["val"].dtype == torch.bool:
                scores = _call(graph, aten.where.ScalarOther, visible, scores, float("-inf"))
            else:
                scores = _call(graph, aten.add.Tensor, scores, visible)
        # Softmax over the positions, in the decomposed ops a post-grad graph holds.
        shifted = _call(graph, aten.sub.Tensor, scores, _call(graph, aten.amax.default, scores, [-1], True))
        exps = _call(graph, aten.exp.default, shifted)
        weights = _call(graph, aten.div.Tensor, exps, _call(graph, aten.sum.dim_IntList, exps, [-1], True))
        values = _call(graph, aten.unsqueeze.default, value, 2)  # (B, KV, 1, L, D)
        picked = _call(graph, aten.unsqueeze.default, weights, -1)  # (B, KV, G, L, 1)
        out = _call(graph, aten.sum.dim_IntList, _call(graph, aten.mul.Tensor, picked, values), [-2])
        out = _call(graph, aten.reshape.default, out, [B, H, 1, D])
    for user in list(node.users):
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _node(arg: Any) -> torch.fx.Node:
    """An argument that must be a node of the graph (the tensors the pattern reads)."""
    assert isinstance(arg, torch.fx.Node), arg
    return arg


def _call(graph: torch.fx.Graph, op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
    """A new node of `op`, with the fake-tensor value Inductor's lowering reads."""
    node = graph.call_function(op, args, kwargs)
    values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    fake_mode = torch._guards.detect_fake_mode(values)
    assert fake_mode is not None  # the graph's values are fake tensors
    with fake_mode:
        node.meta["val"] = op(*values, **kwargs)
    return node
