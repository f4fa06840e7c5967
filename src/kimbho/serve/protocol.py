"""The OpenAI request shapes, as pydantic models: FastAPI validates every request against them
and publishes them in the OpenAPI schema (which the tests fuzz). Limits that depend on the model
(context, vocabulary, slots) are checked in `app.py`, where the model is known.

Fields follow OpenAI's names and meanings; `top_k`, `min_p` and `repetition_penalty` are the
usual extensions of open servers (vLLM, llama.cpp). Unknown fields are ignored, as OpenAI's
clients send fields a small server has no use for (`user`, `service_tier`, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..inference.defaults import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
)

MAX_PROMPTS = 128  # prompts in one completions request
MAX_STOPS = 16
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's, for completions (null means it too)


def _unicode_scalars(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which are not text: no tokenizer or UTF-8
    encoder takes them. Refused at validation, so the error names the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}: not valid Unicode text"
        ) from None
    return text


# Every string of a request: strict (no numbers as strings) and valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_unicode_scalars)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOPS)] | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    # NaN and infinity (which Python's JSON parser accepts) are refused rather than poisoning logits.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    max_tokens: int | None = Field(
        None, ge=1, description="new tokens at most; prompt + max_tokens must fit the context"
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, description="0 is greedy")
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 is off")
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Bounded away from 0 (see `sampling`): a denormal penalty gives infinities (found by the fuzzer).
    repetition_penalty: float = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="CTRL's; 1 is off"
    )
    stop: Stop = Field(None, description="up to 16 strings that end the text (not included)")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="same seed, same text")
    n: int = Field(1, ge=1, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    retrieve: bool = Field(
        True, description="with a server started with --index: false answers without retrieving"
    )

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="a string, a list of strings, a list of token ids, or a list of those")
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS,
        ge=0,
        description="new tokens at most (default 16); 0 with echo and logprobs scores the prompt only",
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probs of the k likeliest tokens"
    )
    echo: bool = False  # with logprobs: the prompt's tokens and their log-probabilities come first


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape, which lm-evaluation-harness's remote tokenizer reads)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Text
    add_special_tokens: bool = Field(False, description="Kimbho's tokenizers add none either way")


class DetokenizeRequest(BaseModel):
    """POST /detokenize"""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


def error_body(
    message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None
) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe_validation_error(errors: Any) -> tuple[int, str, str | None]:
    """Status, one line and the field for FastAPI's validation errors (the first one)."""
    if not errors:
        return 400, "invalid request", None
    # A value refused by one of our validators (a lone surrogate) says more than the union's shapes.
    e = next((x for x in errors if x.get("type") == "value_error"), errors[0])
    loc = [x for x in e.get("loc", ()) if x != "body"]
    kind = e.get("type")
    if kind == "json_invalid":
        return (
            400,
            f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})",
            None,
        )
    if not loc and isinstance(e.get("input"), bytes):  # a body sent without Content-Type: application/json
        return 415, "send the request body as JSON, with the header Content-Type: application/json", None
    if not loc:
        return 400, "the request body must be a JSON object", None
    param = str(loc[0])
    if kind == "value_error":
        where = ".".join(str(x) for x in loc if not str(x).startswith(("str", "list[")))
        return 400, f"{where}: {str(e.get('msg', '')).removeprefix('Value error, ')}", param
    if param in _SHAPES and len(loc) > 1:  # every member of the union failed: name the shapes it takes
        return 400, f"{param}: {_SHAPES.get(param, 'has the wrong type')}", param
    where = ".".join(str(x) for x in loc)
    return 400, f"{where}: {e.get('msg', 'invalid value')}", param


_SHAPES = {
    "prompt": "must be a non-empty string, list of strings, list of token ids (integers >= 0) or list of those",
    "stop": "must be a string or a list of up to 16 strings",
}
