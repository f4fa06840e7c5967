"""Fine-tuning data: JSONL files of conversations in the shapes users have (INTERFACE.md), each
line read into one list of messages.

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   OpenAI chat
    {"prompt": "...", "completion": "..."}                                          one turn
    {"instruction": "...", "input": "...", "output": "..."}                         Alpaca
    {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}      ShareGPT

A message may carry `"train": false`: it stays in the conversation as context but is not a
target. A line that cannot be used is skipped with its reason (`Skipped`), so one bad line does not
cost a user the whole file; `read_conversations` reports them all in one summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KimbhoError

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names -> roles.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = True  # for an assistant message: whether its reply is a target

    def as_dict(self) -> dict[str, str]:
        """The message as chat templates and the OpenAI API take it."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str  # "path:line", for messages about it


@dataclass(frozen=True)
class Skipped:
    where: str
    reason: str


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def read_conversations(paths: Iterable[str | os.PathLike[str]]) -> ReadResult:
    """Every usable conversation of the JSONL files, and the lines skipped with their reasons. A
    missing file, or no usable conversation at all, is a KimbhoError."""
    result = ReadResult()
    files = [Path(p) for p in paths]
    if not files:
        raise KimbhoError("--data needs at least one JSONL file of conversations")
    for path in files:
        if not path.is_file():
            raise KimbhoError(f"{path}: no such file (--data takes JSONL files of conversations)")
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    result.conversations.append(Conversation(parse_example(json.loads(line)), where))
                except json.JSONDecodeError as e:
                    result.skipped.append(Skipped(where, f"not JSON ({e.msg})"))
                except KimbhoError as e:
                    result.skipped.append(Skipped(where, str(e)))
    if not result.conversations:
        raise KimbhoError(
            f"no usable conversation in {', '.join(map(str, files))}"
            + (f": {summarize_skipped(result.skipped)}" if result.skipped else " (the files are empty)")
        )
    return result


def parse_example(example: Any) -> tuple[Message, ...]:
    """One JSONL example, in any of the shapes above, as messages; KimbhoError says why not."""
    if not isinstance(example, dict):
        raise KimbhoError("an example must be a JSON object")
    if "messages" in example:
        messages = _messages(example["messages"], "messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in example:
        messages = _messages(example["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
    elif "prompt" in example and "completion" in example:
        messages = (
            Message("user", _text(example, "prompt")),
            Message("assistant", _text(example, "completion")),
        )
    elif "instruction" in example and "output" in example:
        instruction, extra = _text(example, "instruction"), example.get("input") or ""
        if not isinstance(extra, str):
            raise KimbhoError('"input" must be a string')
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = (Message("user", user), Message("assistant", _text(example, "output")))
    else:
        raise KimbhoError(
            f"unknown shape (keys {', '.join(sorted(example)) or 'none'}): expected messages, "
            f"prompt/completion, instruction/output or conversations"
        )
    if not any(m.role == "assistant" and m.train for m in messages):
        raise KimbhoError("no assistant reply to learn from")
    return messages


def summarize_skipped(skipped: list[Skipped], shown: int = 5) -> str:
    """One line: how many lines were skipped, and the first few with their reasons."""
    listed = "; ".join(f"{s.where}: {s.reason}" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} example(s) skipped ({listed}{more})"


def _messages(
    items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> tuple[Message, ...]:
    if not isinstance(items, list) or not items:
        raise KimbhoError(f'"{key}" must be a non-empty list')
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise KimbhoError(f"{key}[{i}] must be an object")
        role = roles.get(item.get(role_key))  # type: ignore[arg-type]
        if role is None:
            raise KimbhoError(
                f"{key}[{i}]: unknown {role_key} {item.get(role_key)!r} (one of {', '.join(roles)})"
            )
        content = item.get(content_key)
        if not isinstance(content, str):
            raise KimbhoError(f'{key}[{i}]: "{content_key}" must be a string')
        if role == "assistant" and not content.strip():
            raise KimbhoError(f"{key}[{i}]: empty assistant reply")
        train = item.get("train", True)
        if not isinstance(train, bool):
            raise KimbhoError(f'{key}[{i}]: "train" must be true or false')
        messages.append(Message(role, content, train))
    return tuple(messages)


def _text(example: dict[str, Any], key: str) -> str:
    value = example[key]
    if not isinstance(value, str) or not value.strip():
        raise KimbhoError(f'"{key}" must be a non-empty string')
    return value
