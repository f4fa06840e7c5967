"""The compiled decode step's graph pass (`kimbho.inference.small_matmul`): few-row products to
Kimbho's kernels, single-query attention as arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from kimbho.inference import small_matmul
from kimbho.inference.small_matmul import FEW_ROWS, SmallMatmulPass, few_rows
from kimbho.model.quantize import Int8Linear


def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)), w2)


def _graph(fn, *args: torch.Tensor) -> torch.fx.GraphModule:
    """`fn` as the ops Inductor's post-grad graph holds (its decompositions: `t` as a permute,
    `.to` as a conversion)."""
    return make_fx(fn, tracing_mode="fake", decomposition_table=select_decomp_table())(*args)


def _ops(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS])
def test_few_row_products_go_to_the_kernel_with_the_same_values(rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w1, w2 = (torch.randn(shape).to(dtype) for shape in ((rows, 30), (48, 30), (24, 48)))
    gm = _graph(_mlp, x, w1, w2)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2
    SmallMatmulPass()(gm.graph)
    gm.recompile()
    assert torch.ops.aten.mm.default not in _ops(gm)
    assert _ops(gm).count(torch.ops.kimbho.linear.default) == 2
    # The kernel reads each weight matrix as it is stored, not transposed.
    assert [
        n.args[1].meta["val"].shape for n in gm.graph.nodes if n.target is torch.ops.kimbho.linear.default
    ] == [
        (48, 30),
        (24, 48),
    ]
    out = gm(x, w1, w2)  # the operators' reference arithmetic, which the kernels' test checks them against
    assert out.shape == (rows, 24) and out.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.05}
    torch.testing.assert_close(out, _mlp(x, w1, w2), **tolerance)


def test_many_rows_keep_the_matrix_product() -> None:
    x, w1, w2 = torch.randn(FEW_ROWS + 1, 32), torch.randn(48, 32), torch.randn(24, 48)
    gm = _graph(_mlp, x, w1, w2)
    SmallMatmulPass()(gm.graph)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2


@pytest.mark.parametrize("rows", [1, FEW_ROWS + 1])
def test_int8_products_go_to_the_int8_kernel_at_any_number_of_rows(rows: int) -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(40, 24, bias=False))
    x = torch.randn(rows, 40)
    tensors = dict(layer.named_buffers())

    def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"qweight": qweight, "scales": scales}, (x,))

    gm = _graph(forward, x, tensors["qweight"], tensors["scales"])
    SmallMatmulPass()(gm.graph)
    gm.recompile()
    products = [n for n in gm.graph.nodes if n.target is torch.ops.kimbho.int8_linear.default]
    assert len(products) == 1 and torch.ops.aten.mm.default not in _ops(gm)
    assert products[0].args[1].meta["val"].dtype == torch.int8  # the stored matrix, not a float copy
    torch.testing.assert_close(gm(x, tensors["qweight"], tensors["scales"]), layer(x), rtol=1e-4, atol=1e-4)


def test_a_cpu_without_the_kernels_vector_code_keeps_the_matrix_products(monkeypatch) -> None:
    monkeypatch.setattr(small_matmul.cpu_kernels, "VECTORIZED", False)
    x, w1, w2 = torch.randn(1, 32), torch.randn(48, 32), torch.randn(24, 48)
    gm = _graph(_mlp, x, w1, w2)
    SmallMatmulPass()(gm.graph)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2


def test_float_weights_on_intel_leave_products_of_two_rows_to_mkl(monkeypatch) -> None:
    monkeypatch.setattr(small_matmul, "cpu_vendor", lambda: "GenuineIntel")
    assert few_rows() == 1
    x, w1, w2 = torch.randn(2, 32), torch.randn(48, 32), torch.randn(24, 48)
    gm = _graph(_mlp, x, w1, w2)
    SmallMatmulPass(few_rows())(gm.graph)
    assert _ops(gm).count(torch.ops.aten.mm.default) == 2
    assert SmallMatmulPass(1).uuid() != SmallMatmulPass(FEW_ROWS).uuid()  # packages differ
    monkeypatch.setattr(small_matmul, "cpu_vendor", lambda: "AuthenticAMD")
    assert few_rows() == FEW_ROWS


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
