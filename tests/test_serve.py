"""The OpenAI-compatible server, over real HTTP: the official `openai` client and raw requests
against uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

import kimbho
from kimbho import device
from kimbho.config import KimbhoConfig
from kimbho.inference.chat import ChatFormat
from kimbho.serve.app import ServerOptions, create_app
from kimbho.serve.worker import Worker
from tests.conftest import run_cli, running_server

KEY = "sk-test-0123456789"


def _model() -> kimbho.KimbhoV1Model:
    """The `peaked_model` of conftest: random, but with far-from-uniform next-token distributions."""
    torch.manual_seed(0)
    return kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny", init_std=0.2)).eval()


def _app(tokenizer: kimbho.Tokenizer, **options: object):  # type: ignore[no-untyped-def]
    return create_app(_model(), tokenizer, ServerOptions(model_name="tiny", **options), ChatFormat(tokenizer))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tokenizer: kimbho.Tokenizer) -> Iterator[tuple[str, object]]:
    app = _app(tokenizer, slots=4)
    with running_server(app) as url:
        yield url, app


@pytest.fixture
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _greedy(tokenizer: kimbho.Tokenizer, prompt: str, max_tokens: int) -> str:
    """What the engine gives for `prompt` alone: the reference for the server's output."""
    ids = tokenizer.encode(prompt)
    [row] = kimbho.generate_batch(_model(), [ids], max_tokens, eos_token_id=tokenizer.eot_id)
    new = row[len(ids) :]
    return tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eot_id else new)


# The official client.


def test_openai_client_completions(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="The assert statement", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    assert out.choices[0].text == _greedy(tokenizer, "The assert statement", 12)
    assert out.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(tokenizer.encode("The assert statement"))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 12


def test_openai_client_chat(client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens == len(ChatFormat(tokenizer).encode(messages))
    assert out.choices[0].finish_reason in ("stop", "length")
    # max_tokens may be left out: the reply may fill what the context leaves
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert out.usage.total_tokens <= 64


def test_openai_client_streaming(client) -> None:  # type: ignore[no-untyped-def]
    whole = client.completions.create(model="tiny", prompt="Classes", max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(model="tiny", prompt="Classes", max_tokens=16, temperature=0, stream=True)
    )
    assert len(chunks) > 1  # token by token, not one piece
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Tell me about modules"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stream_ends_with_done(server) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and len(lines) == 4  # 3 tokens, then [DONE]


def test_n_and_seed_reproducibility(client) -> None:  # type: ignore[no-untyped-def]
    def sample(seed: int) -> list[str]:
        out = client.completions.create(
            model="tiny", prompt="def ", max_tokens=10, temperature=1.0, n=3, seed=seed
        )
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first  # same seed, same texts
    assert sample(8) != first
    assert len(set(first)) > 1  # the n samples are independent draws
    chat = [
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            temperature=1,
            seed=3,
            n=2,
        )
        for _ in range(2)
    ]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]


def test_prompt_shapes(server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    url = server[0] + "/v1/completions"
    ids = tokenizer.encode("while loops")
    by_text = httpx.post(url, json={"prompt": "while loops", "max_tokens": 6, "temperature": 0}).json()
    by_ids = httpx.post(url, json={"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    several = httpx.post(
        url, json={"prompt": ["while loops", "x"], "max_tokens": 6, "temperature": 0, "n": 2}
    ).json()
    assert [c["index"] for c in several["choices"]] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert several["choices"][0]["text"] == by_text["choices"][0]["text"]
    lists = httpx.post(url, json={"prompt": [ids, [5, 6]], "max_tokens": 6, "temperature": 0}).json()
    assert lists["choices"][0]["text"] == by_text["choices"][0]["text"] and len(lists["choices"]) == 2
    assert lists["usage"]["prompt_tokens"] == len(ids) + 2
    echo = httpx.post(
        url, json={"prompt": "while loops", "max_tokens": 6, "temperature": 0, "echo": True}
    ).json()
    assert echo["choices"][0]["text"] == "while loops" + by_text["choices"][0]["text"]


def test_echo_with_logprobs_scores_the_prompt(server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's legacy echo: each prompt token's log-probability given those before it, as the
    model computes it (what lm-evaluation-harness's local-completions reads)."""
    url = server[0] + "/v1/completions"
    ids = tokenizer.encode("while loops run until")
    with torch.no_grad():
        expected = torch.log_softmax(_model()(torch.tensor([ids])).float(), -1)[0, :-1]
    expected = expected.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
    for max_tokens in (0, 1):
        body = {"prompt": [ids], "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "echo": True}
        out = httpx.post(url, json=body).json()
        [choice] = out["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
        # the likeliest token's log-probability is an upper bound, reached where the prompt is greedy
        for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= chosen - 1e-6
        assert choice["text"].startswith("while loops run until")
        assert lp["text_offset"][: len(ids)] == sorted(lp["text_offset"][: len(ids)])
        assert out["usage"]["completion_tokens"] == max_tokens
    assert choice["finish_reason"] == "length"
    refused = [
        ({"prompt": "x", "max_tokens": 0, "echo": True}, "max_tokens"),  # nothing to generate or score
        ({"prompt": "x", "max_tokens": 0, "logprobs": 1, "echo": True, "stream": True}, "stream"),
    ]
    for body, param in refused:
        response = httpx.post(url, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_tokenizer_routes(server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    base = server[0]
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"]
    text = "def f(x):\n    return x"
    tokens = httpx.post(base + "/tokenize", json={"prompt": text}).json()["tokens"]
    assert tokens == tokenizer.encode(text)
    assert httpx.post(base + "/detokenize", json={"tokens": tokens}).json() == {"prompt": text}
    # a special token's text is that token, as Hugging Face and vLLM read text
    marked = httpx.post(base + "/tokenize", json={"prompt": "x" + info["eos_token"]}).json()["tokens"]
    assert marked == [*tokenizer.encode("x"), tokenizer.eot_id]
    bad = httpx.post(base + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_stop_strings_and_logprobs(server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    url = server[0] + "/v1/completions"
    full = httpx.post(url, json={"prompt": "a", "max_tokens": 20, "temperature": 0}).json()["choices"][0][
        "text"
    ]
    stop = full[5:7]
    cut = httpx.post(url, json={"prompt": "a", "max_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"

    out = httpx.post(url, json={"prompt": "a", "max_tokens": 5, "temperature": 0, "logprobs": 3}).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    # greedy: the chosen token is the likeliest one
    assert all(
        abs(max(top.values()) - chosen) < 1e-5
        for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True)
    )
    chat = httpx.post(
        server[0] + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    entries = chat["choices"][0]["logprobs"]["content"]
    assert len(entries) == chat["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and isinstance(e["bytes"], list) for e in entries)


# Bad requests: each gets a 4xx with OpenAI's error object naming the field, never a 5xx.

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (what, route, body, status, param)
    ("missing prompt", COMPLETIONS, {"max_tokens": 4}, 400, "prompt"),
    ("max_tokens a fraction", COMPLETIONS, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens not a number", COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("max_tokens zero", COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", COMPLETIONS, {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    (
        "prompt + max_tokens over the context",
        COMPLETIONS,
        {"prompt": [3] * 60, "max_tokens": 10},
        400,
        "max_tokens",
    ),
    ("chat max_tokens over the context", CHAT, {"messages": MSG, "max_tokens": 500}, 400, "max_tokens"),
    ("negative temperature", COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("NaN temperature", COMPLETIONS, '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("top_p zero", COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("negative top_k", COMPLETIONS, {"prompt": "x", "top_k": -1}, 400, "top_k"),
    ("min_p above one", COMPLETIONS, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (
        "presence_penalty out of range",
        COMPLETIONS,
        {"prompt": "x", "presence_penalty": 3},
        400,
        "presence_penalty",
    ),
    (
        "frequency_penalty out of range",
        CHAT,
        {"messages": MSG, "frequency_penalty": -2.5},
        400,
        "frequency_penalty",
    ),
    ("n zero", COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    ("n over the slots", COMPLETIONS, {"prompt": "x", "n": 99}, 400, "n"),
    ("logprobs over 20", COMPLETIONS, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("seed out of range", COMPLETIONS, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("empty stop string", COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("empty string in a prompt list", COMPLETIONS, {"prompt": ["ok", ""]}, 400, "prompt"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("empty token list", COMPLETIONS, {"prompt": [[]]}, 400, "prompt"),
    ("prompt of the wrong type", COMPLETIONS, {"prompt": {"text": "x"}}, 400, "prompt"),
    ("out-of-vocabulary token id", COMPLETIONS, {"prompt": [5, 512]}, 400, "prompt"),
    ("negative token id", COMPLETIONS, {"prompt": [5, -1]}, 400, "prompt"),
    ("float token id", COMPLETIONS, {"prompt": [5, 1.5]}, 400, "prompt"),
    # JSON's \ud800 escapes decode to lone surrogates: not text (they were a 500).
    ("lone surrogate in a prompt", COMPLETIONS, {"prompt": "a\ud800b"}, 400, "prompt"),
    ("lone surrogate in a prompt list", COMPLETIONS, {"prompt": ["ok", "\udfff"]}, 400, "prompt"),
    ("lone surrogate in a stop string", COMPLETIONS, {"prompt": "x", "stop": ["\ud800"]}, 400, "stop"),
    (
        "lone surrogate in a message",
        CHAT,
        {"messages": [{"role": "user", "content": "\ud800"}]},
        400,
        "messages",
    ),
    (
        "lone surrogate in a content part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
        400,
        "messages",
    ),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("missing messages", CHAT, {"max_tokens": 3}, 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("message without content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    ("unknown model", COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("invalid JSON", COMPLETIONS, '{"prompt": "x",', 400, None),
    ("a JSON array body", COMPLETIONS, "[1, 2]", 400, None),
    ("a JSON string body", CHAT, '"hello"', 400, None),
    ("JSON null body", CHAT, "null", 400, None),
    ("empty body", COMPLETIONS, "", 400, None),
]


@pytest.mark.parametrize(
    ("what", "route", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request(server, what, route, body, status, param) -> None:  # type: ignore[no-untyped-def]
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server[0] + route, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if what == "prompt + max_tokens over the context":
        assert "60" in error["message"] and "10" in error["message"] and "64" in error["message"]


def test_a_lone_surrogate_is_named(server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        server[0] + COMPLETIONS, content='{"prompt": "\\ud800"}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "lone surrogate (U+D800)" in r.json()["error"]["message"], r.text


# Templates ship with imported models: whatever they do is the model's fault, and a 400.
BROKEN_TEMPLATES = {
    "ZeroDivisionError": "{{ 1 // 0 }}",
    "RecursionError": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "TypeError": "{{ messages + 1 }}",
    "rendered nothing": "{% if false %}x{% endif %}",
    "more than 16,777,216 characters": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("reason", list(BROKEN_TEMPLATES))
def test_a_failing_chat_template_is_a_400(tokenizer, reason: str) -> None:  # type: ignore[no-untyped-def]
    app = create_app(
        _model(), tokenizer, ServerOptions(model_name="tiny"), ChatFormat(tokenizer, BROKEN_TEMPLATES[reason])
    )
    with running_server(app) as url:
        r = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and reason in r.json()["error"]["message"]


def test_a_slow_chat_template_neither_stalls_the_server_nor_runs_unbounded(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Rendering runs off the event loop: /health answers while a ~2 s template renders, and the
    request gets a 400 once the time limit (lowered here) has passed."""
    import kimbho.serve.service as app_module

    monkeypatch.setattr(app_module, "TEXT_SECONDS", 0.5)
    slow = "{% for m in messages %}{% for i in range(100000) %}{% for j in range(200) %}{% endfor %}{% endfor %}{% endfor %}x"
    app = create_app(_model(), tokenizer, ServerOptions(model_name="tiny"), ChatFormat(tokenizer, slow))
    with running_server(app) as url:
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: result.setdefault(
                "r",
                httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60),
            )
        )
        thread.start()
        time.sleep(0.2)  # the template is rendering now
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(10):
                start = time.perf_counter()
                assert http.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
        thread.join()
    print(
        f"\n/health while a slow template renders: median {sorted(latencies)[5] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )
    # ~70 ms each on a quiet machine (one 585 ms outlier seen): a blocked loop would wait out the
    # whole ~2 s render.
    assert max(latencies) < 1.5
    r = result["r"]
    assert r.status_code == 400 and "took longer than 0.5 s" in r.json()["error"]["message"], r.text


def test_bad_request_through_the_openai_client(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]


def test_wrong_content_type_and_unknown_routes(server) -> None:  # type: ignore[no-untyped-def]
    # A body that is not declared JSON is refused (a browser page cannot post one without a CORS preflight)
    r = httpx.post(
        server[0] + COMPLETIONS, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert httpx.get(server[0] + "/v1/nothing").status_code == 404
    assert httpx.get(server[0] + COMPLETIONS).status_code == 405
    assert "error" in httpx.get(server[0] + "/v1/nothing").json()


def test_oversized_body(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with running_server(_app(tokenizer, max_body_bytes=1000)) as url:
        big = json.dumps({"prompt": "x" * 2000})
        r = httpx.post(url + COMPLETIONS, content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds while reading
            for i in range(0, len(big), 100):
                yield big[i : i + 100].encode()

        r = httpx.post(url + COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        ok = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


# Authentication.


def test_api_key_guards_every_route_but_health(tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer, api_key=KEY)
    routes = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m in ("GET", "POST")}
    assert {
        ("GET", "/"),
        ("GET", "/v1/models"),
        ("POST", COMPLETIONS),
        ("POST", CHAT),
        ("GET", "/health"),
    } <= routes
    assert ("GET", "/openapi.json") in routes and ("GET", "/docs") in routes
    body = {"prompt": "x", "max_tokens": 2, "messages": MSG, "tokens": [5]}  # every POST route's fields
    with running_server(app) as url:
        for method, path in sorted(routes):
            path = path.replace("{model_id}", "tiny")
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": KEY},
                {"X-Api-Key": KEY},
            ):
                r = httpx.request(
                    method, url + path, headers=headers, json=body if method == "POST" else None
                )
                if path == "/health":
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (method, path, headers)
                    assert r.json()["error"]["type"] == "authentication_error"
            r = httpx.request(
                method,
                url + path,
                headers={"Authorization": f"Bearer {KEY}"},
                json=body if method == "POST" else None,
            )
            assert r.status_code == 200, (method, path, r.text)
        assert httpx.get(url + "/no-such-route").status_code == 401  # unknown paths too: nothing leaks
        assert httpx.get(url + "/", auth=("anyone", KEY)).status_code == 200  # a browser's login prompt
        assert httpx.get(url + "/", auth=("anyone", "wrong")).status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_api_key_from_the_environment(trained_run, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kimbho.serve import build_app

    monkeypatch.setenv("KIMBHO_API_KEY", KEY)
    app = build_app(trained_run, slots=2)
    assert app.state.options.api_key == KEY and app.state.options.model_name == Path(trained_run).name
    assert app.state.chat is not None and app.state.chat.template is None  # Kimbho's role tokens
    with running_server(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert models["data"][0]["id"] == Path(trained_run).name


def test_cli_serve_errors(trained_run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run_cli("serve", tmp_path / "missing") == 1
    assert "does not exist" in capsys.readouterr().err
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli("serve", trained_run, "--port", port) == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    assert run_cli("serve", trained_run, "--timeout", "0") == 1
    assert "timeout must be > 0" in capsys.readouterr().err


# Concurrency: the engine is held at a gate so that what the tests assert never depends on timing.


class Gate:
    """Holds the worker's engine before step number `after` + 1 until `open()`."""

    def __init__(self, worker: Worker, after: int = 0) -> None:
        self.event, self.after, self.steps = threading.Event(), after, 0
        step = worker.engine.step

        def gated_step():  # type: ignore[no-untyped-def]
            self.steps += 1
            if self.steps > self.after:
                assert self.event.wait(30), "the test never opened the gate"
            return step()

        worker.engine.step = gated_step  # type: ignore[method-assign]

    def open(self) -> None:
        self.event.set()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_concurrent_requests_are_batched(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Eight clients at once: the first request is held at the gate while the other seven queue;
    they all join its batch, and every step advances all eight."""
    app = _app(tokenizer, slots=8)
    worker = app.state.worker
    gate = Gate(worker)
    with running_server(app) as url:

        async def clients() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"prompt": "The", "max_tokens": 20, "temperature": 0}
                tasks = [asyncio.create_task(http.post(COMPLETIONS, json=body)) for _ in range(8)]
                # all eight submitted while the engine is held at its first step
                await asyncio.to_thread(
                    _wait_for, lambda: worker.stats.jobs == 8 and gate.steps == 1, "8 requests"
                )
                gate.open()
                return [(await t).json() for t in tasks]

        results = asyncio.run(clients())
    assert len({r["choices"][0]["text"] for r in results}) == 1  # batching changes no output
    stats = worker.stats
    assert stats.max_batch == 8 and stats.jobs == 8
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    assert stats.tokens == generated and stats.steps <= generated / 4  # tokens came 8 (or nearly) a step


def test_full_queue_answers_429(tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer, slots=1, max_queue=1)
    worker = app.state.worker
    gate = Gate(worker)
    with running_server(app) as url:
        body = {"prompt": "x", "max_tokens": 4}
        with httpx.Client(base_url=url, timeout=60) as http:
            results: list[httpx.Response] = []
            first = threading.Thread(target=lambda: results.append(http.post(COMPLETIONS, json=body)))
            first.start()
            _wait_for(lambda: gate.steps == 1, "the first request in its slot")
            second = threading.Thread(target=lambda: results.append(http.post(COMPLETIONS, json=body)))
            second.start()
            _wait_for(lambda: worker.stats.waiting == 1, "the second request queued")
            r = http.post(COMPLETIONS, json=body)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="tiny", prompt="x", max_tokens=1
                )
            gate.open()
            first.join()
            second.join()
            assert [r.status_code for r in results] == [200, 200]
            assert http.post(COMPLETIONS, json=body).status_code == 200  # room again


def test_a_queued_request_whose_client_left_leaves_the_queue(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """One slot, a queue of one. The slot is busy; a non-streaming request waits in the queue and
    its client gives up: the server drops it from the queue, so the next request is queued (not
    refused with 429) and answered."""
    app = _app(tokenizer, slots=1, max_queue=1)
    worker = app.state.worker
    gate = Gate(worker)
    with running_server(app) as url:
        body = {"prompt": "x", "max_tokens": 4}
        with httpx.Client(base_url=url, timeout=60) as http:
            results: list[httpx.Response] = []
            first = threading.Thread(target=lambda: results.append(http.post(COMPLETIONS, json=body)))
            first.start()
            _wait_for(lambda: gate.steps == 1, "the first request in its slot")
            with pytest.raises(httpx.ReadTimeout):  # the client waits 0.5 s, then hangs up
                httpx.post(url + COMPLETIONS, json=body, timeout=0.5)
            _wait_for(lambda: worker.stats.waiting == 0, "the abandoned request to leave the queue")
            third = threading.Thread(target=lambda: results.append(http.post(COMPLETIONS, json=body)))
            third.start()
            _wait_for(lambda: worker.stats.waiting == 1, "the third request queued")
            gate.open()
            first.join()
            third.join()
            assert [r.status_code for r in results] == [200, 200]


def test_shutdown_ends_open_streams_with_an_error_and_done(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """What `kimbho serve` does on SIGTERM, before uvicorn waits for connections: a stream in
    flight gets an error event and [DONE] (it was cut with neither), new requests a 503."""
    app = _app(tokenizer, slots=1)
    gate = Gate(app.state.worker, after=2)
    with running_server(app) as url:
        body = {"prompt": "x", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")  # generating; the engine is held at the gate
            app.state.begin_shutdown()
            rest = list(lines)
        gate.open()
        assert rest[-1] == "data: [DONE]"
        errors = [json.loads(line[6:]) for line in rest[:-1] if '"error"' in line]
        assert errors and "shutting down" in errors[-1]["error"]["message"]
        late = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]


def test_disconnect_stops_generation_and_frees_the_slot(tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer, slots=1)
    worker = app.state.worker
    gate = Gate(worker, after=2)
    cancelled = threading.Event()
    cancel = worker.cancel

    def spy(job):  # type: ignore[no-untyped-def]
        cancelled.set()
        cancel(job)

    worker.cancel = spy  # type: ignore[method-assign]
    with running_server(app) as url:
        body = {"prompt": "x", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the first token arrived; now hang up
        assert cancelled.wait(20), "the server did not notice the disconnect"
        gate.open()
        _wait_for(
            lambda: worker.engine.free_slots == 1 and worker.stats.cancelled == 1, "the slot to be freed"
        )
        assert worker.stats.tokens < 60  # generation stopped early
        ok = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_request_timeout(tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer, slots=1, timeout=0.3)
    worker = app.state.worker
    gate = Gate(worker)
    with running_server(app) as url:
        r = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 5}, timeout=60)
        assert r.status_code == 408 and "timeout of 0.3 s" in r.json()["error"]["message"]
        gate.open()
        _wait_for(lambda: worker.engine.free_slots == 1, "the slot to be freed")
        assert worker.stats.cancelled == 1
        stream = httpx.post(
            url + COMPLETIONS, json={"prompt": "x", "max_tokens": 5, "stream": True}, timeout=60
        )
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")


def test_slots_are_sized_by_a_bounded_default_not_the_declared_context(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The cache is allocated for every slot at full length: a model declaring a long context
    gets slots of 8192 tokens unless --max-len asks for more."""
    from kimbho.serve.app import DEFAULT_MAX_LEN

    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny", max_seq_len=4 * DEFAULT_MAX_LEN)).eval()
    app = create_app(model, tokenizer, ServerOptions(slots=2), ChatFormat(tokenizer))
    assert app.state.worker.engine.max_len == DEFAULT_MAX_LEN
    app = create_app(
        model, tokenizer, ServerOptions(slots=1, max_len=3 * DEFAULT_MAX_LEN), ChatFormat(tokenizer)
    )
    assert app.state.worker.engine.max_len == 3 * DEFAULT_MAX_LEN


@pytest.mark.skipif(device._gnu_openmp() is None, reason="PyTorch's OpenMP here is not GNU OpenMP")
def test_the_building_threads_cpu_threads_are_handed_over() -> None:
    """A thread that ran parallel CPU work keeps a pool of OpenMP threads; handing over ends
    them, so that the engine's thread is the only one with a pool (`device.hand_over_cpu_threads`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a pool of one helper thread at least, whatever the machine
    try:
        _hand_over_and_count()
    finally:
        torch.set_num_threads(threads)


def _hand_over_and_count() -> None:
    hand_over_cpu_threads = device.hand_over_cpu_threads

    def tasks() -> int:
        return len(list(Path("/proc/self/task").iterdir()))

    counts: list[int] = []

    def build_then_hand_over() -> None:
        before = tasks()
        torch.ones(2**22).sum()  # parallel work: this thread's pool starts
        counts.append(tasks() - before)
        assert hand_over_cpu_threads()
        for _ in range(200):  # the pool's threads exit on their own, soon after
            if tasks() == before:
                break
            time.sleep(0.01)
        counts.append(tasks() - before)
        torch.ones(2**22).sum()  # and it still computes (a new pool, if needed)

    thread = threading.Thread(target=build_then_hand_over)
    thread.start()
    thread.join()
    assert counts == [1, 0]
