"""What the routes do: validated requests become engine requests (checked by the engine's own
rules), engine events become OpenAI responses, JSON or server-sent events; tokenizing and chat
templates run off the event loop."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..data.tokenizer import Tokenizer
from ..errors import KimbhoError, RequestError
from ..evaluation.tasks import TokenScores
from ..inference.chat import ChatFormat
from ..inference.engine import Engine, TokenEvent
from ..inference.engine import Request as EngineRequest
from ..inference.sampling import SamplingParams
from ..retrieval.augment import Augmenter
from .protocol import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Sampling,
    error_body,
)
from .worker import Job, QueueFull, Worker

DEFAULT_MAX_LEN = 8192  # tokens per slot unless --max-len says otherwise


@dataclass
class ServerOptions:
    """How the server runs. `slots`: sequences decoded together; `max_queue`: requests that may
    wait for a slot before new ones get 429; `timeout`: seconds a request may take, waiting
    included; `max_body_bytes`: larger request bodies get 413; `max_len`: tokens per slot (prompt
    + output; default the model's context, at most `DEFAULT_MAX_LEN`: the cache is allocated for
    every slot at full length, and an imported model may declare a context of 128k tokens)."""

    model_name: str = "kimbho"
    api_key: str | None = None
    slots: int = 8
    max_queue: int = 64
    timeout: float = 600.0
    max_body_bytes: int = 2 * 1024 * 1024
    max_len: int | None = None
    k: int = 4  # passages retrieved per chat request, with an index

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise KimbhoError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.timeout > 0:
            raise KimbhoError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.max_body_bytes < 1:
            raise KimbhoError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")


class APIError(Exception):
    """A request the server refuses: becomes OpenAI's error object with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type


class Service:
    """Turns validated requests into engine requests and engine events into OpenAI responses."""

    def __init__(
        self,
        worker: Worker,
        tokenizer: Tokenizer,
        chat_format: ChatFormat | None,
        options: ServerOptions,
        augmenter: Augmenter | None = None,
    ) -> None:
        self.worker, self.tokenizer, self.chat_format, self.options = worker, tokenizer, chat_format, options
        self.augmenter = augmenter
        self.engine: Engine = worker.engine
        self.vocab = self.engine.model.config.vocab_size
        self.created = int(time.time())
        self.token_bytes = tokenizer.token_bytes
        self.live: set[Job] = set()  # jobs whose handler is waiting on their events
        self.stopping = False

    def begin_shutdown(self) -> None:
        """The server is stopping (SIGTERM): every request in flight ends now, a stream with an
        error event and `[DONE]`, a plain request with a 503; new requests get a 503. Safe to call
        from any thread."""
        self.stopping = True
        for job in list(self.live):
            job.loop.call_soon_threadsafe(job.events.put_nowait, _shutting_down())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.options.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "kimbho",
            "max_model_len": self.engine.max_len,
        }

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {self.options.model_name!r}",
                "model",
            )

    # Completions.

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self.check_model(body.model)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS
        prompt, citations = body.prompt, None
        if self.augmenter is not None:  # a text prompt (one) gets passages; scored or id prompts do not
            augmenter, passages = self.augmenter, []
            if body.retrieve and isinstance(prompt, str) and not body.echo:
                prompt, passages = await _off_the_loop(
                    lambda text: augmenter.prompt(text, max_tokens), prompt, "retrieving passages", "prompt"
                )
            citations = [p.as_dict() for p in passages]
        prompts = await _off_the_loop(self._prompt_ids, prompt, "tokenizing the prompt", "prompt")
        # echo with logprobs scores the prompt itself, as OpenAI's legacy completions did: what
        # lm-evaluation-harness's local-completions model asks to compute log-likelihoods.
        score_prompt = body.echo and body.logprobs is not None
        if max_tokens == 0 and not score_prompt:
            raise APIError(
                400,
                "max_tokens: 0 generates nothing; it is for scoring a prompt with echo: true and logprobs",
                "max_tokens",
            )
        if score_prompt and body.stream:
            raise APIError(
                400, "echo with logprobs scores the prompt in one response: send stream: false", "stream"
            )
        requests = [self._engine_request(body, ids, max_tokens, body.logprobs) for ids in prompts]
        kind = {"object": "text_completion", "id": f"cmpl-{uuid.uuid4().hex}"}
        echo = [self.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        n = body.n
        if body.stream:
            job = self._submit(requests)

            def chunk(p: int, e: TokenEvent, first: bool) -> dict[str, Any]:
                logprobs = self._completion_logprobs([e]) if body.logprobs is not None else None
                text = (echo[p] if first else "") + e.text
                return {
                    "index": p * n + e.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": e.finish_reason,
                }

            return self._sse(
                job, body, requests, kind, chunk, {"citations": citations} if citations is not None else {}
            )
        prompt_scores = await self._score_prompts(prompts, body.logprobs or 0) if score_prompt else None
        if max_tokens:
            outputs = await self._collect(self._submit(requests), requests, request)
        else:
            outputs = [[[] for _ in range(n)] for _ in prompts]
        choices = []
        for p, samples in enumerate(outputs):
            for i, events in enumerate(samples):
                text = "".join(e.text for e in events)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs(events)
                    if prompt_scores is not None:
                        prompt_part = self._prompt_logprobs(prompts[p], prompt_scores[p])
                        logprobs = _joined(prompt_part, logprobs, len(echo[p]))
                finish = _finish(events) if max_tokens else "length"
                choices.append(
                    {
                        "index": p * n + i,
                        "text": echo[p] + text,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }
                )
        response = self._response(kind, choices, requests, outputs)
        return {**response, "citations": citations} if citations is not None else response

    async def _score_prompts(self, prompts: list[list[int]], top: int) -> list[TokenScores]:
        """Every prompt token's log-probability given the tokens before it (and the `top`
        likeliest there), computed on the engine's thread."""
        from ..evaluation.tasks import score_tokens

        model = self.engine.model
        pairs = [(ids[:1], ids[1:]) for ids in prompts]
        try:
            future = self.worker.call(lambda: score_tokens(model, pairs, top))
        except QueueFull as e:
            raise APIError(429, f"{e}; retry shortly", None, "rate_limit_error") from None
        try:
            return await asyncio.wait_for(future, self.options.timeout)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"scoring took longer than the server's timeout of {self.options.timeout:g} s",
                None,
                "timeout",
            ) from None

    # Chat.

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        self.check_model(body.model)
        if self.chat_format is None:
            raise APIError(
                400,
                "this model has no chat format (no role tokens, no chat_template): use /v1/completions",
                "messages",
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        max_tokens = body.max_completion_tokens or body.max_tokens
        citations: list[dict[str, Any]] | None = None
        if self.augmenter is not None:
            augmenter = self.augmenter
            passages = []
            if body.retrieve:
                # Without max_tokens the passages leave the reply a quarter of the slot.
                budget = max_tokens or max(self.engine.max_len // 4, 1)
                messages, passages = await _off_the_loop(
                    lambda m: augmenter.messages(m, budget), messages, "retrieving passages", "messages"
                )
            citations = [p.as_dict() for p in passages]
        ids = await _off_the_loop(
            self.chat_format.encode, messages, "rendering the chat template", "messages"
        )
        if not ids:
            raise APIError(400, "the model's chat template rendered nothing for these messages", "messages")
        if max_tokens is None:  # as OpenAI: the reply may fill what the context leaves
            max_tokens = max(self.engine.max_len - len(ids), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request_ = self._engine_request(
            body, ids, max_tokens, logprobs, self.chat_format.stop_token_ids, chat=True
        )
        job = self._submit([request_])
        kind: dict[str, Any] = {"object": "chat.completion", "id": f"chatcmpl-{uuid.uuid4().hex}"}

        if body.stream:
            kind["object"] = "chat.completion.chunk"

            def chunk(p: int, e: TokenEvent, first: bool) -> dict[str, Any]:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": e.text} if first else {"content": e.text}
                )
                logprobs = {"content": self._chat_logprobs([e])} if body.logprobs else None
                return {
                    "index": e.index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": e.finish_reason,
                }

            return self._sse(
                job, body, [request_], kind, chunk, {"citations": citations} if citations is not None else {}
            )
        outputs = await self._collect(job, [request_], request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                "logprobs": {"content": self._chat_logprobs(events)} if body.logprobs else None,
                "finish_reason": _finish(events),
            }
            for i, events in enumerate(outputs[0])
        ]
        response = self._response(kind, choices, [request_], outputs)
        return {**response, "citations": citations} if citations is not None else response

    # The tokenizer, for clients that count or score tokens themselves.

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """Special-token text becomes its token, as vLLM's /tokenize (and Hugging Face) read it."""
        self.check_model(body.model)
        ids = await _off_the_loop(
            self.tokenizer.encode_marked, body.prompt, "tokenizing the prompt", "prompt"
        )
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_len}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        bad = next((t for t in body.tokens if t >= self.vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the model's vocabulary of {self.vocab}", "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        from ..interop.keymap import special_tokens

        specials = special_tokens(self.tokenizer)
        return {
            **{f"{role}_token": text for role, (text, _) in specials.items()},
            "chat_template": self.chat_format.jinja if self.chat_format is not None else None,
            "model_max_length": self.engine.max_len,
            "vocab_size": self.vocab,
        }

    # Requests.

    def _prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """The prompt(s) as token id lists (checked with the rest of the request, by the engine)."""
        prompts: list[Any] = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        return [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]

    def _engine_request(
        self,
        body: _Sampling,
        ids: list[int],
        max_tokens: int,
        logprobs: int | None,
        stop_ids: tuple[int, ...] | None = None,
        chat: bool = False,
    ) -> EngineRequest:
        """The engine request for one prompt of `body`, checked by the engine's own rules; a
        request it refuses is a 400 naming the API's field for the one at fault."""
        eot = self.tokenizer.eot_id
        try:
            params = SamplingParams(
                temperature=body.temperature,
                top_k=body.top_k or None,
                top_p=body.top_p,
                min_p=body.min_p or None,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
            )
            request = EngineRequest(
                ids,
                max_tokens,
                params,
                body.seed,
                stop_ids if stop_ids is not None else ((eot,) if eot is not None else ()),
                body.stops(),
                body.n,
                logprobs,
            )
            self.engine.check(request)
        except RequestError as e:
            names = _CHAT_PARAMS if chat else _COMPLETION_PARAMS
            raise APIError(400, str(e), names.get(e.field or "", e.field)) from None
        return request

    def _submit(self, requests: list[EngineRequest]) -> Job:
        if self.stopping:
            raise _shutting_down()
        try:
            return self.worker.submit(requests)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry shortly", None, "rate_limit_error") from None
        except KimbhoError as e:  # checked above already; kept as a 400 should a check be missed
            raise APIError(400, str(e)) from None

    # Responses.

    async def _events(
        self, job: Job, requests: list[EngineRequest]
    ) -> AsyncGenerator[tuple[int, TokenEvent]]:
        """(prompt index, event) pairs of `job` until every sequence has finished; cancels the
        job if the consumer stops early (a disconnect) or the deadline passes."""
        remaining = sum(r.n for r in requests)
        # The deadline arrives as an event of its own: one timer per request, not one per token
        # (a `wait_for` around each token's wait made a task and a timer per token).
        timeout = APIError(
            408,
            f"the request took longer than the server's timeout of {self.options.timeout:g} s",
            None,
            "timeout",
        )
        deadline = asyncio.get_running_loop().call_later(self.options.timeout, job.events.put_nowait, timeout)
        self.live.add(job)
        try:
            while remaining:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                for pair in item:
                    remaining -= pair[1].finish_reason is not None
                    yield pair
        finally:
            deadline.cancel()
            self.live.discard(job)
            if remaining:
                self.worker.cancel(job)

    async def _collect(
        self, job: Job, requests: list[EngineRequest], request: Request
    ) -> list[list[list[TokenEvent]]]:
        """Every event, per prompt and sample. A client that hangs up stops the generation, or
        leaves the queue if it was still waiting there (so it holds no place a new request needs)."""
        outputs: list[list[list[TokenEvent]]] = [[[] for _ in range(r.n)] for r in requests]
        watcher = asyncio.create_task(_watch_for_hang_up(request, job))
        events = self._events(job, requests)
        try:
            async for p, event in events:
                outputs[p][event.index].append(event)
        except _ClientGone:
            pass  # nobody reads the answer; _events has cancelled the job
        finally:
            watcher.cancel()
            await events.aclose()
        return outputs

    def _sse(
        self,
        job: Job,
        body: _Sampling,
        requests: list[EngineRequest],
        kind: dict[str, Any],
        choice: Callable[[int, TokenEvent, bool], dict[str, Any]],
        first_extra: dict[str, Any] | None = None,
    ) -> StreamingResponse:
        """Server-sent events: one chunk per token (the first with `first_extra`'s fields too:
        the citations), then (if asked) usage, then `data: [DONE]`. Starlette cancels this
        generator when the client disconnects, which cancels the job."""
        created = int(time.time())
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def stream() -> AsyncIterator[str]:
            started: set[tuple[int, int]] = set()
            generated = 0
            pending = dict(first_extra or {})  # fields of the first chunk only
            events = self._events(job, requests)
            try:
                async for p, e in events:
                    generated += 1
                    first = (p, e.index) not in started
                    started.add((p, e.index))
                    extra, pending = pending, {}
                    yield event(
                        {
                            **kind,
                            "created": created,
                            "model": self.options.model_name,
                            "choices": [choice(p, e, first)],
                            **extra,
                        }
                    )
            except APIError as e:  # the timeout: headers are sent, so the error goes in the stream
                yield event(error_body(e.message, e.param, e.type))
            except Exception as e:  # a failure of the worker (a bug): reported in the stream too
                yield event(error_body(f"generation failed: {e}", None, "server_error"))
            finally:
                await events.aclose()
            if include_usage:
                usage = self._usage(requests, generated)
                yield event(
                    {
                        **kind,
                        "created": created,
                        "model": self.options.model_name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def _response(
        self,
        kind: dict[str, Any],
        choices: list[dict[str, Any]],
        requests: list[EngineRequest],
        outputs: list[list[list[TokenEvent]]],
    ) -> dict[str, Any]:
        generated = sum(len(events) for samples in outputs for events in samples)
        return {
            **kind,
            "created": int(time.time()),
            "model": self.options.model_name,
            "choices": choices,
            "usage": self._usage(requests, generated),
        }

    @staticmethod
    def _usage(requests: list[EngineRequest], generated: int) -> dict[str, int]:
        prompt = sum(len(r.prompt) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        if self.token_bytes is not None:
            raw = self.token_bytes[token] if token < len(self.token_bytes) else b""
        else:
            raw = self.tokenizer.decode([token]).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _completion_logprobs(self, events: list[TokenEvent]) -> dict[str, Any]:
        """The legacy completions format: parallel lists per generated token."""
        offsets, offset = [], 0
        for e in events:
            offsets.append(offset)
            offset += len(e.text)
        return {
            "tokens": [self._token_text(e.token)[0] for e in events],
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{self._token_text(t)[0]: lp for t, lp in e.top_logprobs or []} for e in events],
            "text_offset": offsets,
        }

    def _prompt_logprobs(self, ids: list[int], scores: TokenScores) -> dict[str, Any]:
        """The same lists for the prompt's tokens; the first has no context, so no log-probability."""
        stream = self.tokenizer.text_stream()
        offsets, offset = [], 0
        for token in ids:
            offsets.append(offset)
            offset += len(stream.push(token))
        tops = [{self._token_text(t)[0]: lp for t, lp in top} for top in scores.top] or [{}] * len(
            scores.logprobs
        )
        return {
            "tokens": [self._token_text(t)[0] for t in ids],
            "token_logprobs": [None, *scores.logprobs],
            "top_logprobs": [None, *tops],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, events: list[TokenEvent]) -> list[dict[str, Any]]:
        def entry(token: int, logprob: float | None) -> dict[str, Any]:
            text, raw = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return [
            {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs or []]}
            for e in events
        ]


def _joined(prompt: dict[str, Any], generated: dict[str, Any], end: int) -> dict[str, Any]:
    """The prompt's logprobs lists followed by the generated tokens' (whose text starts at `end`)."""
    return {
        "tokens": prompt["tokens"] + generated["tokens"],
        "token_logprobs": prompt["token_logprobs"] + generated["token_logprobs"],
        "top_logprobs": prompt["top_logprobs"] + generated["top_logprobs"],
        "text_offset": prompt["text_offset"] + [end + o for o in generated["text_offset"]],
    }


def _finish(events: list[TokenEvent]) -> str | None:
    """A sequence's finish reason (None only when its client hung up before the end)."""
    return events[-1].finish_reason if events else None


# The API's name for each field of an engine request (`RequestError.field`), where it differs.
_COMPLETION_PARAMS = {"max_new_tokens": "max_tokens"}


_CHAT_PARAMS = {"max_new_tokens": "max_tokens", "prompt": "messages", "logprobs": "top_logprobs"}


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry the request shortly", None, "server_error")


class _ClientGone(Exception):
    """Put on a job's event queue when its (non-streaming) client has hung up."""


async def _watch_for_hang_up(request: Request, job: Job, every: float = 0.25) -> None:
    """Until cancelled, check whether the client of `request` has disconnected; if so, wake the
    handler waiting on `job`'s events (queued jobs get none) with `_ClientGone`."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.events.put_nowait(_ClientGone())


# How long tokenizing a request's text or rendering its chat template may take. Both run in a
# worker thread, so the event loop (and /health) stays responsive meanwhile; a thread that runs
# past this limit cannot be stopped and finishes in the background, but its request gets a 400.
TEXT_SECONDS = 10.0


async def _off_the_loop(work: Callable[[Any], Any], argument: Any, what: str, param: str) -> Any:
    """`work(argument)` in a worker thread, with a time limit; a failure (the template's or the
    tokenizer's, whatever its kind) is a 400 naming `param`, never a 500."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(work, argument), TEXT_SECONDS)
    except APIError:
        raise
    except TimeoutError:
        raise APIError(400, f"{what} took longer than {TEXT_SECONDS:g} s; send less text", param) from None
    except Exception as e:  # a request's text is the user's input: whatever it breaks is a 4xx
        reason = str(e) if isinstance(e, KimbhoError) else f"{type(e).__name__}: {e}"
        raise APIError(400, f"{what} failed: {reason[:300]}", param) from None
