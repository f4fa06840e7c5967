"""Prompts built from retrieved passages: the one format that `generate --index`, `serve --index`
and `finetune --index` share, so the model is trained on exactly what it is served.

The passages come first, numbered, then the user's own text:

    Passages:
    [1] <passage text>
    [2] <passage text>

    Question: <the prompt, or the last user message>

Passages are taken best first while the prompt (with the reply's budget) still fits the model's
context; none found, the user's text is left as it is, so the model answers as it would without
an index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import KimbhoError
from .index import Passage

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer
    from ..inference.chat import ChatFormat
    from . import Retriever


def with_passages(text: str, passages: Sequence[Passage]) -> str:
    """`text` with `passages` before it, in the format above."""
    if not passages:
        return text
    numbered = "\n".join(f"[{n}] {' '.join(p.text.split())}" for n, p in enumerate(passages, start=1))
    return f"Passages:\n{numbered}\n\nQuestion: {text}"


def fit(
    passages: Sequence[Passage], length: Callable[[Sequence[Passage]], int], budget: int
) -> list[Passage]:
    """The longest best-first run of `passages` whose prompt is at most `budget` tokens
    (`length(chosen)` measures the prompt built with them)."""
    chosen: list[Passage] = []
    for passage in passages:
        if length([*chosen, passage]) > budget:
            break
        chosen.append(passage)
    return chosen


def last_user_message(messages: Sequence[dict[str, Any]]) -> int | None:
    """The index of the last user message (what is retrieved for), or None."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)


def augment_messages(messages: Sequence[dict[str, Any]], passages: Sequence[Passage]) -> list[dict[str, Any]]:
    """`messages` with `passages` put before the last user message's content."""
    out = [dict(m) for m in messages]
    at = last_user_message(out)
    if at is not None:
        out[at]["content"] = with_passages(out[at]["content"], passages)
    return out


class Augmenter:
    """Retrieves passages for a prompt or a conversation (its last user message) with
    `retriever` and builds what the model sees, fitting the model's `context`."""

    def __init__(
        self, retriever: Retriever, k: int, tokenizer: Tokenizer, chat: ChatFormat | None, context: int
    ) -> None:
        if k < 1:
            raise KimbhoError(f"--k must be at least 1, got {k}")
        from .index import Index

        if isinstance(retriever, Index):
            built_for = retriever.info.tokenizer_sha256
            if built_for is not None and built_for != tokenizer.sha256:
                raise KimbhoError(
                    f"index {retriever.path} was chunked with another tokenizer than the model's "
                    f"(sha256 {built_for[:12]} vs {tokenizer.sha256[:12]}): refused; rebuild it for this model "
                    f"with `kimbho index build --tokenizer MODEL ...`"
                )
        self.retriever, self.k, self.context = retriever, k, context
        self.tokenizer, self.chat = tokenizer, chat

    def prompt(self, text: str, reply_tokens: int) -> tuple[str, list[Passage]]:
        """A plain prompt with the passages found for it, leaving `reply_tokens` of the context."""
        found = self.retriever.search(text, self.k)
        # +1: a prompt may begin with end-of-text (`generation.encode_prompt`).
        length = lambda ps: len(self.tokenizer.encode(with_passages(text, ps))) + 1  # noqa: E731
        chosen = fit(found, length, self.context - reply_tokens)
        return with_passages(text, chosen), chosen

    def messages(
        self, messages: Sequence[dict[str, Any]], reply_tokens: int
    ) -> tuple[list[dict[str, Any]], list[Passage]]:
        """Chat messages with the passages found for the last user message, leaving `reply_tokens`."""
        assert self.chat is not None
        chat = self.chat
        return self._augment(messages, lambda m: len(chat.encode(m)) + reply_tokens)

    def conversation(
        self, messages: Sequence[dict[str, Any]], targets: Sequence[bool]
    ) -> tuple[list[dict[str, Any]], list[Passage]]:
        """A training conversation with the passages found for its last user message, the whole
        conversation (reply included) fitting a training row (`context` + 1 ids)."""
        assert self.chat is not None
        chat = self.chat
        return self._augment(messages, lambda m: len(chat.encode_conversation(m, targets)[0]) - 1)

    def _augment(
        self, messages: Sequence[dict[str, Any]], length: Callable[[list[dict[str, Any]]], int]
    ) -> tuple[list[dict[str, Any]], list[Passage]]:
        at = last_user_message(messages)
        if at is None:
            return list(messages), []
        found = self.retriever.search(str(messages[at]["content"]), self.k)
        chosen = fit(found, lambda ps: length(augment_messages(messages, ps)), self.context)
        return augment_messages(messages, chosen), chosen
