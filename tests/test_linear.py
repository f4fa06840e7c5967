"""The model's linear layer: oneDNN for fp32 CPU products outside autograd, F.linear elsewhere."""

from unittest import mock

import torch
import torch.nn.functional as F

import kimbho
from kimbho.inference.engine import Engine, Request
from kimbho.model import linear as linear_module
from kimbho.model.linear import Linear


def _calls(layer: Linear, x: torch.Tensor, grad: bool) -> tuple[int, torch.Tensor]:
    """How many products of `layer(x)` went to oneDNN, and the output."""
    assert linear_module._onednn_available()  # (checked once, with a product of its own)
    spy = mock.patch.object(linear_module, "_onednn_linear", wraps=linear_module._onednn_linear)
    with spy as called, torch.set_grad_enabled(grad):
        out = layer(x)
    return called.call_count, out


def test_inference_products_go_to_onednn_and_equal_f_linear():
    torch.manual_seed(0)
    layer, x = Linear(48, 24, bias=True), torch.randn(2, 5, 48)
    calls, out = _calls(layer, x, grad=False)
    assert calls == 1
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():
        assert _calls(layer, x, grad=False)[0] == 1


def test_training_autocast_bf16_and_compiled_graphs_keep_f_linear():
    torch.manual_seed(0)
    layer, x = Linear(16, 8, bias=False), torch.randn(4, 16)
    calls, out = _calls(layer, x, grad=True)
    assert calls == 0  # autograd records F.linear and its backward
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 product, as it decides
        calls, out = _calls(layer, x, grad=False)
    assert calls == 0 and out.dtype == torch.bfloat16
    graphs: list[str] = []

    def record(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(str(gm.graph))
        return gm.forward

    with torch.no_grad():
        torch.compile(layer.float(), backend=record)(x)
    assert graphs and "mkldnn" not in graphs[0]  # the compiled decode step rewrites the plain product


def test_bf16_products_run_in_fp32_where_bf16_would_be_emulated(monkeypatch):
    """On a CPU without native bf16 a bf16 product is the fp32 product of the same (exact)
    values, rounded once; on one with it, PyTorch's own bf16 product."""
    torch.manual_seed(0)
    layer, x = Linear(48, 24, bias=True).to(torch.bfloat16), torch.randn(2, 5, 48).bfloat16()
    monkeypatch.setenv("KIMBHO_CPU_BF16", "0")
    calls, out = _calls(layer, x, grad=False)
    assert calls == 1 and out.dtype == torch.bfloat16
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    torch.testing.assert_close(out, exact, rtol=2**-7, atol=1e-3)  # within a rounding of bf16
    monkeypatch.setenv("KIMBHO_CPU_BF16", "1")
    calls, out = _calls(layer, x, grad=False)
    assert calls == 0 and out.dtype == torch.bfloat16


def test_greedy_tokens_of_a_prefilled_prompt_equal_the_forward_pass():
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(kimbho.KimbhoConfig.from_preset("tiny")).eval()
    prompt = torch.randint(5, model.config.vocab_size, (40,)).tolist()
    out = [e.token for e in Engine(model, slots=1, compile=False).run([Request(prompt, 8)])]
    ids = list(prompt)
    for _ in range(8):  # recomputed from scratch each time, with autograd on: F.linear throughout
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_the_availability_check_leaves_the_random_stream_and_autocast_alone():
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where training first calls it
        assert linear_module._onednn_available.__wrapped__()
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run draws what the first one did
