"""Shared tiny fixtures. Everything is built from the built-in corpus (CPython's docs), so tests
need no network and nothing outside the repository."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kimbho
from kimbho.cli import main as cli_main
from kimbho.config import KimbhoConfig, RunConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent

# Engines decode eager unless a test asks for the compiled step (tests/test_decode_package.py):
# a background build for every served or evaluated tiny model would cost the suite minutes of
# CPU. Set in the environment so the servers tests start as subprocesses inherit it.
os.environ.setdefault("KIMBHO_COMPILE_DECODE", "0")


@pytest.fixture(scope="session", autouse=True)
def decode_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's own cache of compiled decode steps: built by the tests that compile, shared
    among them, and never the user's."""
    root = tmp_path_factory.mktemp("kimbho-cache")
    os.environ["KIMBHO_CACHE_DIR"] = str(root)
    return root / "decode"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only where PyTorch sees a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus prepared with a 512-token tokenizer."""
    out = tmp_path_factory.mktemp("data") / "docs"
    kimbho.prepare(None, out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tokenizer(data_dir: Path) -> kimbho.Tokenizer:
    return kimbho.Tokenizer.from_file(data_dir / "tokenizer.json")


def tiny_run_config(**train: object) -> RunConfig:
    """The `tiny` preset (2 query heads per K/V head) with a short, quiet training schedule."""
    defaults: dict[str, object] = dict(
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=5,
        max_steps=40,
        log_every=5,
        eval_every=20,
        eval_tokens=2048,
        save_every=20,
        sample_tokens=8,
        seed=0,
    )
    return RunConfig(KimbhoConfig.from_preset("tiny"), TrainConfig(**{**defaults, **train}))  # type: ignore[arg-type]


WALL_CLOCK_FIELDS = ("elapsed_sec", "tokens_per_sec", "mfu")


def without_wall_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl records less the fields that measure time: what must be equal between a run
    and the same run interrupted and resumed."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained for 120 steps: enough for loss to fall well below chance."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    kimbho.Trainer(
        tiny_run_config(max_steps=120, eval_every=60, save_every=60), data_dir, out, progress_bar=False
    ).fit()
    return out


@pytest.fixture
def tiny_model() -> kimbho.KimbhoV1Model:
    torch.manual_seed(0)
    return kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny")).eval()


@pytest.fixture
def peaked_model() -> kimbho.KimbhoV1Model:
    """A random `tiny` model with large weights: its next-token distributions are far from uniform,
    so different prompts and seeds lead to visibly different outputs."""
    torch.manual_seed(0)
    return kimbho.KimbhoV1Model(KimbhoConfig.from_preset("tiny", init_std=0.2)).eval()


def run_cli(*args: str) -> int:
    """Run the `kimbho` command in this process (fast); returns its exit status."""
    return cli_main([str(a) for a in args])


def run_subprocess(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m kimbho ...` as a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "kimbho", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        **kwargs,
    )


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve an ASGI `app` with uvicorn on a free loopback port, in a thread; yields its base URL.
    No fixed port, so tests never collide with each other or with anything else on the machine."""
    import uvicorn

    from kimbho.serve import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# Text that trips up tokenizer conversions: special-token strings as plain text, combining marks,
# emoji (4-byte UTF-8), non-breaking and thin spaces, CRLF, runs of whitespace, contractions.
TRICKY = [
    "The assert statement",
    "<|endoftext|> is text here, not a document boundary<|pad|><|user|>",
    "naïve café, 日本語のテキスト, Ünïcödé, e\u0301 (combining), 😀🎉👩‍👩‍👧",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "  leading spaces\r\n\r\n\ttabs   and trailing   ",
    "don't, I'll, we've, they're, it's, O'Neil's",
    "x = [1, 2, 3]\nfor i in range(10):\n    print(i ** 2)  # 0123456789",
    "",
]


@pytest.fixture
def kimbho_log() -> Iterator[list[str]]:
    """Messages of the `kimbho` logger during the test (the CLI turns its propagation off, so
    pytest's caplog does not always see them)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("kimbho"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)
