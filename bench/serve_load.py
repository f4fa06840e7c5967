"""Load on `kimbho serve`: N concurrent streaming clients for a bounded time, on loopback.

    python bench/serve_load.py runs/small --clients 1 8 32 --seconds 20
    python bench/serve_load.py --preset small --clients 1 8 32   # random weights: speed only

The server runs in a child process (its own interpreter, as `kimbho serve` would), the clients
in this one: each client sends streaming completion requests back to back until the time is up.
The server decodes as `kimbho serve` does by default; on the CPU it waits, before it starts
serving, for its compiled decode steps (one per bucket of 1, 2, 4, ... slots) to be built, once per
machine, or set `KIMBHO_COMPILE_DECODE=0` to time eager decoding.
Reported per level: completed requests, generated tokens, aggregate tokens/s (and its ratio to
one client: what continuous batching buys), request latency p50/p99, time to first token p50,
and errors (anything but a clean stream ending in [DONE]). Then, with the server stopped, the
engine's own single stream on the same requests: what one client's tokens/s is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = [
    "The assert statement",
    "Once upon a time",
    "A class definition defines",
    "To iterate over a list",
    "Exceptions are raised when",
    "The import system",
    "In the beginning",
    "Functions are defined with",
]


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0


def _serve(sock: socket.socket, model: str | None, preset: str, slots: int) -> None:
    """The child process: load (or build) the model and serve on the inherited socket."""
    import uvicorn

    from kimbho.inference.chat import ChatFormat
    from kimbho.serve import build_app
    from kimbho.serve.app import ServerOptions, create_app

    if model:
        app = build_app(model, slots=slots, max_queue=1024, model_name="bench")
    else:
        model_, tokenizer = _random_model(preset)
        app = create_app(
            model_,
            tokenizer,
            ServerOptions(model_name="bench", slots=slots, max_queue=1024),
            ChatFormat(tokenizer),
        )
    compiled = app.state.worker.engine.compiled
    if compiled is not None:  # steady state: the compiled steps, built once per machine, are timed
        compiled.wait()
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _random_model(preset: str):  # type: ignore[no-untyped-def]
    """A `preset` model with random weights and a tokenizer trained on the built-in corpus
    (cached in the temp directory): decoding speed does not depend on what the weights hold."""
    import torch

    import kimbho

    cfg = kimbho.KimbhoConfig.from_preset(preset)
    path = Path(tempfile.gettempdir()) / f"kimbho-bench-tokenizer-{cfg.vocab_size}.json"
    if not path.is_file():
        from kimbho.data.sources import CorpusSource

        kimbho.Tokenizer.train(CorpusSource(None, "text").texts(), cfg.vocab_size).save(path)
    tokenizer = kimbho.Tokenizer.from_file(path)
    torch.manual_seed(0)
    return kimbho.KimbhoV1Model(cfg).eval(), tokenizer


def _engine_stream(model: str | None, preset: str, slots: int, seconds: float, max_tokens: int) -> float:
    """The reference for one client: the engine's own single stream, in this process with the
    server stopped, on the same model, slots (so the same compiled step) and requests (prompt,
    sampling, seed, end-of-text), one at a time for `seconds`; its tokens/s."""
    import kimbho
    from kimbho.inference.defaults import DEFAULT_TOP_P
    from kimbho.inference.engine import Engine, Request
    from kimbho.inference.sampling import SamplingParams

    model_, tokenizer = kimbho.load(model) if model else _random_model(preset)
    engine = Engine(model_, tokenizer, slots=slots, compile=True)
    stop = (tokenizer.eot_id,) if tokenizer.eot_id is not None else ()
    tokens, i = 0, 0
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        request = Request(
            ids, max_tokens, SamplingParams(0.8, top_p=DEFAULT_TOP_P), seed=i, stop_token_ids=stop
        )
        tokens += sum(1 for _ in engine.run([request]))
        i += 1
    return tokens / (time.monotonic() - start)


async def _client(url: str, level: Level, deadline: float, max_tokens: int, index: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        i = index
        while time.monotonic() < deadline:
            body = {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": i,
                "stream": True,
            }
            i += level.clients
            start = time.monotonic()
            first = None
            tokens = 0
            done = False
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        level.errors += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            break
                        tokens += len(chunk["choices"])
                        first = first or time.monotonic() - start
            except Exception:  # noqa: BLE001 - any failure counts as an error in the table
                level.errors += 1
                continue
            if not done:
                level.errors += 1
                continue
            level.latencies.append(time.monotonic() - start)
            level.first_token.append(first or 0.0)
            level.tokens += tokens


async def _run_level(url: str, clients: int, seconds: float, max_tokens: int) -> Level:
    level = Level(clients)
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(_client(url, level, deadline, max_tokens, c) for c in range(clients)))
    level.seconds = time.monotonic() - start  # in-flight requests finish after the deadline
    return level


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="run, checkpoint or Hugging Face directory")
    parser.add_argument("--preset", default="small", help="without MODEL: random weights of this preset")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each level sends requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = multiprocessing.get_context("fork").Process(
        target=_serve, args=(sock, args.model, args.preset, max(args.clients)), daemon=True
    )
    server.start()
    import httpx

    for _ in range(2400):  # the child loads the model (or trains the tokenizer, or builds) first
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        sys.exit("the server did not start")
    asyncio.run(_run_level(url, 1, 2.0, args.max_tokens))  # warm-up
    import torch  # only now: the server process was forked from a parent without torch threads

    print(
        f"model: {args.model or args.preset + ' (random weights)'}; {args.max_tokens} new tokens per request, "
        f"streamed; {args.seconds:g} s per level; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print()
    print(
        "| clients | requests | tokens | tokens/s | vs 1 client | latency p50 | latency p99 | first token p50 | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    try:
        for clients in args.clients:
            level = asyncio.run(_run_level(url, clients, args.seconds, args.max_tokens))
            rate = level.tokens / level.seconds
            base = base or rate
            print(
                f"| {clients} | {len(level.latencies)} | {level.tokens} | {rate:.0f} | {rate / base:.1f}x | "
                f"{_percentile(level.latencies, 50):.2f} s | {_percentile(level.latencies, 99):.2f} s | "
                f"{_percentile(level.first_token, 50) * 1000:.0f} ms | {level.errors} |",
                flush=True,
            )
    finally:
        server.terminate()
        server.join()
    if base is not None:
        alone = _engine_stream(args.model, args.preset, max(args.clients), args.seconds, args.max_tokens)
        print()
        print(
            f"the engine's own single stream, same requests one at a time (no server): {alone:.0f} tokens/s; "
            f"one client gets {base / alone:.2f}x of it"
        )


if __name__ == "__main__":
    main()
