"""The oneDNN route for prompt passes: the same products as F.linear, only where it applies."""

from unittest import mock

import torch
import torch.nn.functional as F

import kimbho
from kimbho.inference import onednn
from kimbho.inference.engine import Engine, Request

CPU = torch.device("cpu")


def _routed(rows: int, grad: bool = False, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
    """How many products went to oneDNN in a pass of `rows` rows, and its output."""
    x, w, b = torch.randn(rows, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype), torch.randn(8, dtype=dtype)
    with mock.patch.object(onednn, "_linear", wraps=onednn._linear) as spy, torch.set_grad_enabled(grad):
        with onednn.onednn_linears(CPU, rows):
            out = F.linear(x, w, b)
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    return spy.call_count, out


def test_fp32_products_outside_autograd_go_to_onednn_from_enough_rows():
    assert onednn.available()
    assert _routed(onednn.FROM_ROWS)[0] == 1
    assert _routed(onednn.FROM_ROWS - 1)[0] == 0  # below the crossover the mode costs more than it saves
    assert _routed(onednn.FROM_ROWS, grad=True)[0] == 0  # training keeps autograd's own product
    assert _routed(onednn.FROM_ROWS, dtype=torch.bfloat16)[0] == 0
    assert isinstance(onednn.onednn_linears(torch.device("meta"), 1000), type(onednn.nullcontext()))


def test_a_long_prefill_gives_the_forward_pass_logits_and_greedy_tokens():
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(kimbho.KimbhoConfig.from_preset("tiny")).eval()
    prompt = torch.randint(5, model.config.vocab_size, (onednn.FROM_ROWS + 8,)).tolist()
    engine = Engine(model, slots=1, compile=False)
    with mock.patch.object(onednn, "_linear", wraps=onednn._linear) as spy:
        logits = engine.prefill(0, [prompt])
    assert spy.call_count > 0
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)
    out = [e.token for e in Engine(model, slots=1, compile=False).run([Request(prompt, 8)])]
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]
