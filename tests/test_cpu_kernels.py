"""Kimbho's CPU kernels (`kimbho.inference.cpu_kernels`), compiled as the package builder compiles
them and called as a package calls them: through AOTInductor's C shims, against the operators'
reference arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kimbho.inference import cpu_kernels
from kimbho.inference.decode_package import cache_dir

kimbho = torch.ops.kimbho


class _Products(torch.nn.Module):
    """Products the kernels must get right: one row and several passes of rows (8 a pass) with a
    remainder, output features in blocks and one by one (counts not divisible by the blocks),
    widths with a tail past the 16-column vectors, an int8 width past the 4,096 columns whose
    int32 sums would overflow (all at their largest), bf16 input rows, and input rows read
    through a transposed view."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("q40", torch.randint(-127, 128, (24, 40), dtype=torch.int8))
        self.register_buffer("q_wide", torch.full((3, 8200), 127, dtype=torch.int8))
        self.register_buffer("q7", torch.randint(-127, 128, (7, 40), dtype=torch.int8))
        self.register_buffer("f9", torch.randn(9, 48))
        self.register_buffer("f40", torch.randn(24, 40))
        self.register_buffer("b48", torch.randn(20, 48).bfloat16())
        self.register_buffer("b40", torch.randn(24, 40).bfloat16())

    def forward(self, x40: torch.Tensor, x48: torch.Tensor, wide: torch.Tensor) -> list[torch.Tensor]:
        return [
            kimbho.int8_linear(x40[:1], self.q40),
            kimbho.int8_linear(x40, self.q40),  # 19 rows: passes of 8, 8 and 3
            kimbho.int8_linear(x40.bfloat16(), self.q40),
            kimbho.int8_linear(x40.t().contiguous().t(), self.q40),
            kimbho.int8_linear(wide, self.q_wide),
            kimbho.int8_linear(x40[:3], self.q7),  # features in blocks, then one at a time
            kimbho.linear(x40[:1], self.f40),
            kimbho.linear(x40[:9], self.f40),
            kimbho.linear(x48[:3], self.b48),
            kimbho.linear(x48[:3].bfloat16(), self.b48),
            kimbho.linear(x40[:5], self.b40),
            kimbho.linear(x48.t().contiguous().t()[:3], self.b48),
            kimbho.linear(x48[:1], self.f9),
        ]


def test_the_kernels_compute_what_the_operators_define(tmp_path: Path) -> None:
    torch.manual_seed(1)
    inputs = (torch.randn(19, 40), torch.randn(4, 48), torch.full((2, 8200), 1000.0))
    module = _Products().eval()
    expected = module(*inputs)  # the operators' Python arithmetic
    exported = torch.export.export(module, inputs)
    cpu_kernels.load_library(cpu_kernels.build_library(cache_dir()))
    package = torch._inductor.aoti_compile_and_package(
        exported,
        package_path=str(tmp_path / "products.pt2"),
        inductor_configs={"aot_inductor.custom_ops_to_c_shims": cpu_kernels.C_SHIMS},
    )
    got = torch._inductor.aoti_load_package(package)(*inputs)
    assert len(got) == len(expected)
    for i, (ours, reference) in enumerate(zip(got, expected, strict=True)):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, i
        if i < 6:  # int8: exact integer sums, the same rounding of the rows
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0, msg=f"product {i}")
        else:  # float: the same terms summed in another order
            tolerance = 1e-5 if ours.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance, msg=f"product {i}")
    # The wide product's sums are 8,200 x 32,767 x 127: past int32, exact only if taken out in time.
    assert got[4][0, 0].item() == pytest.approx(8200 * 127 * 1000.0, rel=1e-6)


def test_the_library_is_built_once_and_named_by_its_source(tmp_path: Path) -> None:
    path = cpu_kernels.build_library(tmp_path)
    assert path == cpu_kernels.library_path(tmp_path) and path.exists()
    built = path.stat().st_mtime_ns
    assert cpu_kernels.build_library(tmp_path) == path and path.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing half-written left behind
