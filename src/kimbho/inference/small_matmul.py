"""Fast matrix products over a few rows on the CPU, for the compiled decode step.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so its
speed is how fast the weights are read. MKL's matrix-vector product reads them on one thread,
whatever `torch.get_num_threads()` says, at a fraction of what the memory delivers, and it has
no int8 product. `SmallMatmulPass` gives each such product to Kimbho's own kernels
(`cpu_kernels`): one pass over the weights, split across all threads, each weight read once for
every input row, in the weights' own dtype (fp32, bf16, or int8 at a quarter of fp32's bytes).
From some number of rows (`few_rows`) MKL's product of float weights is left as it is.

It makes that rewrite in the compiled graph, after autograd and decompositions, where every
linear layer is an `aten.mm` (of an int8 layer: of its weights converted, which the kernel reads
as stored instead). It also writes single-query attention (one new token per sequence) as plain
arithmetic: a call to PyTorch's fused attention kernel per layer cost more than the few products
it does, and splits the step into separate kernels. Outside a compiled CPU decode step nothing
changes: eager mode keeps MKL (oneDNN, `model/linear.py`) and the fused attention.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..device import cpu_vendor
from . import cpu_kernels  # defines torch.ops.kimbho

aten = torch.ops.aten
prims = torch.ops.prims

# Up to this many rows the kernels take products by float weights, timing the compiled decode
# step of `small` (docs/generation.md, Decode speed). On a Zen 3 (AVX2) the fp32 step with the
# kernels took 1.50 / 2.30 / 3.82 ms for 1 / 4 / 8 rows against 3.90 / 8.52 / 7.72 with MKL's
# products, and 1.52 / 2.46 / 3.33 against 1.63 / 3.58 / 6.30 with the Inductor reduction that
# came before them. On Intel CPUs see `few_rows`.
FEW_ROWS = 8


def few_rows() -> int:
    """Up to how many rows the kernels replace a product by float weights on this CPU (int8
    weights always go to the int8 kernel: MKL would read them dequantized to fp32, every step).
    On an Intel CPU: 1 row only. There MKL's product (and oneDNN's, bf16) was 1.7-2.8x faster
    than the Inductor reduction that preceded the kernels from 2 rows (a 2-core Sapphire Rapids:
    fp32 2 rows 1.18 against 2.02 ms, 8 rows 3.0 against 7.0; bf16 8 rows 2.2 against 6.1), and
    the kernels have not been measured against it there. Elsewhere `FEW_ROWS`."""
    return FEW_ROWS if cpu_vendor() != "GenuineIntel" else 1


class SmallMatmulPass(CustomGraphPass):
    """An Inductor post-grad pass: each CPU `mm` by int8 weights, and by float weights of at most
    `rows` rows (`few_rows`), becomes a call of Kimbho's kernel, and each single-query fused
    attention becomes plain arithmetic. AOTInductor takes it as its `post_grad_custom_post_pass`,
    with `cpu_kernels.C_SHIMS`: the package's code then calls the kernels (anywhere else the
    operators would run their Python reference)."""

    def __init__(self, rows: int = FEW_ROWS) -> None:
        self.rows = rows

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.target is aten.mm.default:
                _rewrite_matmul(graph, node, self.rows)
            elif node.target is aten._scaled_dot_product_flash_attention_for_cpu.default:
                _rewrite_attention(graph, node)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__, cpu_kernels.__file__, str(cpu_kernels.SOURCE))), self.rows)


def _rewrite_matmul(graph: torch.fx.Graph, node: torch.fx.Node, few_rows: int) -> None:
    """rows (M, K) @ weight.T by Kimbho's kernel: for int8 weights, and float weights if M <= few_rows."""
    rows, weight_t = (_node(a) for a in node.args)  # (M, K) and (K, N): the weight transposed
    val = rows.meta["val"]
    if val.device.type != "cpu":
        return
    kernel = _kernel_for(weight_t, val.shape[0] <= few_rows)
    if kernel is None:
        return
    op, weight = kernel
    with graph.inserting_before(node):
        out = _call(graph, op, rows, weight)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _kernel_for(weight_t: torch.fx.Node, few: bool) -> tuple[Any, torch.fx.Node] | None:
    """Kimbho's kernel for a product by `weight_t` (a weight matrix (N, K) transposed) and the
    matrix it reads, or None: int8 weights converted to the rows' dtype (`Int8Linear`), and fp32
    and bf16 weights for few rows."""
    if (
        not cpu_kernels.VECTORIZED
        or weight_t.target is not aten.permute.default
        or weight_t.args[1] != [1, 0]
    ):
        return None
    weight = _node(weight_t.args[0])
    if weight.target is prims.convert_element_type.default:
        stored = _node(weight.args[0])
        if stored.meta["val"].dtype == torch.int8 and stored.meta["val"].is_contiguous():
            return torch.ops.kimbho.int8_linear.default, stored
    if (
        few
        and weight.meta["val"].dtype in (torch.float32, torch.bfloat16)
        and weight.meta["val"].is_contiguous()
    ):
        return torch.ops.kimbho.linear.default, weight
    return None


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
