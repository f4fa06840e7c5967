"""The playground page in a real headless browser (Debian's chromium, driven by Playwright):
type a prompt, press Generate, watch streamed text arrive; Stop ends a generation early."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import kimbho
from kimbho.config import KimbhoConfig
from kimbho.inference.chat import ChatFormat
from kimbho.serve.app import ServerOptions, create_app
from tests.conftest import running_server

CHROMIUM = os.environ.get("KIMBHO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"no chromium binary at {CHROMIUM} (apt-get install chromium, or set KIMBHO_CHROMIUM)",
)


@pytest.fixture
def page():  # type: ignore[no-untyped-def]
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _app(tokenizer: kimbho.Tokenizer, **options: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny", init_std=0.2)).eval()
    return create_app(model, tokenizer, ServerOptions(model_name="tiny", **options), ChatFormat(tokenizer))  # type: ignore[arg-type]


def test_playground_streams_text(page, tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer)
    step = app.state.worker.engine.step

    def paced_step():  # type: ignore[no-untyped-def]
        time.sleep(0.01)  # a model of realistic speed: tokens arrive apart, not in one network read
        return step()

    app.state.worker.engine.step = paced_step
    seen: list[int] = []  # the length of the output text at each DOM change: it grows piece by piece
    with running_server(app) as url:
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        page.fill("#prompt", "The for statement")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.expose_function("record", lambda n: seen.append(n))
        page.evaluate(
            "new MutationObserver(() => record(document.getElementById('output').textContent.length))"
            ".observe(document.getElementById('output'), {subtree: true, characterData: true, childList: true})"
        )
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')")
        output = page.inner_text("#output")
        status = page.inner_text("#status")
    expected = _greedy_text(tokenizer, "The for statement", 40)
    assert output == "The for statement" + expected and expected
    assert "finish:" in status and "error" not in status
    assert len(set(seen)) > 3  # many updates, not the whole text at once
    assert app.state.worker.stats.jobs == 1


def test_playground_stop_button(page, tokenizer) -> None:  # type: ignore[no-untyped-def]
    app = _app(tokenizer, slots=1)
    worker = app.state.worker
    release = threading.Event()
    step = worker.engine.step
    steps = 0

    def slow_step():  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        if steps > 3:
            release.wait(30)  # held after three tokens until the page has pressed Stop
        return step()

    worker.engine.step = slow_step
    cancelled = threading.Event()
    cancel = worker.cancel

    def spy(job):  # type: ignore[no-untyped-def]
        cancelled.set()
        cancel(job)

    worker.cancel = spy
    with running_server(app) as url:
        page.goto(url + "/")
        page.fill("#prompt", "x")
        page.fill("#max_tokens", "60")
        page.click("#generate")
        page.wait_for_function("document.getElementById('output').textContent.length > 1")
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent.includes('stopped')")
        assert cancelled.wait(20), "the server did not notice the browser hang up"
        release.set()
        page.wait_for_function("!document.getElementById('generate').disabled")
        deadline = time.monotonic() + 20
        while worker.engine.free_slots != 1:  # the slot comes back once the held step is done
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert worker.stats.tokens < 60 and worker.stats.cancelled == 1


def _greedy_text(tokenizer: kimbho.Tokenizer, prompt: str, max_tokens: int) -> str:
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny", init_std=0.2)).eval()
    ids = tokenizer.encode(prompt)
    [row] = kimbho.generate_batch(model, [ids], max_tokens, eos_token_id=tokenizer.eot_id)
    new = row[len(ids) :]
    return tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eot_id else new)
