"""The compiled decode step's rewrite of few-row matrix products (`kimbho.inference.small_matmul`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kimbho.inference import small_matmul
from kimbho.inference.small_matmul import FEW_ROWS, SPLIT, SmallMatmulPass, few_rows


def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)), w2)


def _ops(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS])
def test_few_row_products_become_multiply_and_sum_with_the_same_values(rows: int) -> None:
    """The first product's 30 inputs are summed in one run, the second's 48 in SPLIT runs."""
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(rows, 30), torch.randn(48, 30), torch.randn(24, 48)
    gm = make_fx(_mlp, tracing_mode="fake")(x, w1, w2)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2
    SmallMatmulPass()(gm.graph)
    gm.recompile()
    assert torch.ops.aten.mm.default not in _ops(gm)
    assert _ops(gm).count(torch.ops.aten.sum.dim_IntList) == 2
    # The inputs of both products are stored, not recomputed per output feature.
    sums = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    rows_read = [n.args[0].args[1].args[0] for n in sums]  # mul(weight, reshape(rows))
    assert all(n.meta.get("inductor_realize_to_strides") for n in rows_read)
    assert [n.args[0].meta["val"].shape[-2:] for n in sums] == [(1, 30), (SPLIT, 48 // SPLIT)]
    out = gm(x, w1, w2)
    assert out.shape == (rows, 24) and out.is_contiguous()
    torch.testing.assert_close(out, _mlp(x, w1, w2), rtol=1e-5, atol=1e-4)


def test_many_rows_keep_the_matrix_product() -> None:
    x, w1, w2 = torch.randn(FEW_ROWS + 1, 32), torch.randn(48, 32), torch.randn(24, 48)
    gm = make_fx(_mlp, tracing_mode="fake")(x, w1, w2)
    SmallMatmulPass()(gm.graph)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2


def test_float_weights_on_intel_leave_products_of_two_rows_to_mkl(monkeypatch) -> None:
    x, w1, w2 = torch.randn(2, 32), torch.randn(48, 32), torch.randn(24, 48)
    monkeypatch.setattr(small_matmul, "cpu_vendor", lambda: "GenuineIntel")
    assert (few_rows(int8=False), few_rows(int8=True)) == (1, FEW_ROWS)
    for rows, products in ((few_rows(int8=False), 2), (few_rows(int8=True), 0)):
        gm = make_fx(_mlp, tracing_mode="fake")(x, w1, w2)
        SmallMatmulPass(rows)(gm.graph)
        assert _ops(gm).count(torch.ops.aten.mm.default) == products
    assert SmallMatmulPass(1).uuid() != SmallMatmulPass(FEW_ROWS).uuid()  # packages differ
    monkeypatch.setattr(small_matmul, "cpu_vendor", lambda: "AuthenticAMD")
    assert few_rows(int8=False) == FEW_ROWS


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_single_query_attention_becomes_arithmetic_with_the_same_values(mask_dtype: torch.dtype) -> None:
    """One query per sequence over 10 cached positions, 6 query heads sharing 2 key/value heads;
    each row sees its own number of positions."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    visible = torch.arange(10) <= torch.tensor([3, 9])[:, None]  # (2, 10)
    mask = visible[:, None, None, :]
    if mask_dtype != torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    gm = make_fx(attend, tracing_mode="fake")(q, k, v, mask)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert fused in _ops(gm)
    SmallMatmulPass()(gm.graph)
    gm.recompile()
    assert fused not in _ops(gm)
    torch.testing.assert_close(gm(q, k, v, mask), attend(q, k, v, mask), rtol=1e-5, atol=1e-5)
