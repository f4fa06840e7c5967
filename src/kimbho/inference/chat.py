"""Chat formats: a conversation (a list of {"role", "content"} messages) -> prompt token ids.

Two formats, picked by what the model carries:

- **A Hugging Face `chat_template`** (from `tokenizer_config.json` or `chat_template.jinja` of an
  imported model directory): the Jinja template the model was trained with. It is rendered in
  Jinja's `ImmutableSandboxedEnvironment`, as transformers does, so a template cannot reach
  Python internals (`__class__`, `__globals__`, ...) or mutate its inputs; special-token strings
  in its output (`<|eot_id|>`) are encoded as the special tokens they name.
- **The default role-token format** of Kimbho tokenizers, for base models trained here:
  `<|system|>` / `<|user|>` / `<|assistant|>` + the encoded content + `<|endoftext|>` per message,
  then `<|assistant|>` for the reply, which ends at end-of-text. The role markers are special
  tokens that text can never produce, so a user message cannot forge another turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..data.conversations import ROLES
from ..data.tokenizer import _EOT_NAMES, EOT, Tokenizer
from ..errors import KimbhoError

# A rendered prompt longer than this is refused: 8x the server's largest request body.
MAX_RENDERED_CHARS = 16 * 1024 * 1024


class ChatFormat:
    """Turns messages into prompt ids for one model; `stop_token_ids` end the reply."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
        # Every end-of-text spelling the tokenizer has: Llama 3 ends a turn with <|eot_id|> but
        # its `eot_id` is <|end_of_text|>.
        self.stop_token_ids = tuple(sorted({vocab[name] for name in _EOT_NAMES if name in vocab}))
        if template is not None:
            from jinja2 import TemplateError

            env = _sandbox()
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson
            try:
                self._compiled = env.from_string(template)
            except TemplateError as e:
                raise KimbhoError(f"the model's chat_template does not compile: {e}") from None
            # Text -> ids with special-token strings recognised (Kimbho's own tokenizer refuses
            # them in text, on purpose; the rendered template is trusted model configuration).
            self._special_encoder = tokenizer.marked
        else:
            missing = [f"<|{r}|>" for r in ROLES if tokenizer.token_to_id(f"<|{r}|>") is None]
            if missing or tokenizer.eot_id is None:
                raise KimbhoError(
                    f"the tokenizer has no chat format: it lacks {', '.join(missing) or EOT} and the model "
                    f"directory has no chat_template"
                )
            found = {r: tokenizer.token_to_id(f"<|{r}|>") for r in ROLES}
            self._role_ids = {r: i for r, i in found.items() if i is not None}  # all of them: checked

    @property
    def jinja(self) -> str:
        """The format as a Jinja chat template, for other runtimes (the Hugging Face and GGUF
        exports): the model's own template, or one that renders the role-token format, which
        the exported tokenizer encodes to the ids `encode` gives."""
        if self.template is not None:
            return self.template
        assert self.tokenizer.eot_id is not None  # the role-token format has one: checked
        eot = self.tokenizer.inner.id_to_token(self.tokenizer.eot_id)
        quoted = ", ".join(f"'{r}'" for r in ROLES)
        return (
            "{%- for message in messages -%}"
            f"{{%- if message['role'] not in [{quoted}] -%}}"
            f"{{{{ raise_exception('role ' + message['role'] + ' is not one of {', '.join(ROLES)}') }}}}"
            "{%- endif -%}"
            f"<|{{{{ message['role'] }}}}|>{{{{ message['content'] }}}}{eot}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
        )

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, model_dir: str | os.PathLike[str] | None) -> ChatFormat | None:
        """The model directory's chat template if it has one, else the default role-token format;
        None when neither is available (the model can still complete text)."""
        template = read_chat_template(Path(model_dir)) if model_dir is not None else None
        try:
            return cls(tokenizer, template)
        except KimbhoError:
            if template is not None:
                raise
            return None

    def encode(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt ids for `messages`, ending where the assistant's reply begins. A message the
        format cannot take (or a template's `raise_exception`) is a KimbhoError."""
        if not messages:
            raise KimbhoError("messages must hold at least one message")
        if self.template is None:
            ids: list[int] = []
            for m in messages:
                ids += self._role_message(m)
            return [*ids, self._role_ids["assistant"]]
        # The batch call releases the GIL (see `Tokenizer.encode`).
        text = self._render(messages, add_generation_prompt=True)
        return self._special_encoder.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_conversation(
        self, messages: Sequence[dict[str, Any]], targets: Sequence[bool]
    ) -> tuple[list[int], list[bool]]:
        """A whole conversation as training ids, and which ids are targets: the content of each
        assistant message whose `targets` entry is True, and the token that ends it. Everything
        else (system and user turns, role markers, replies kept as context) is prompt.

        The prompt of reply i is exactly `encode(messages[:i])`, what generation feeds the model,
        so the model learns to continue the prompts it will be given."""
        if self.template is None:
            ids, mask = [], []
            for m, target in zip(messages, targets, strict=True):
                piece = self._role_message(m)
                ids += piece
                # The role marker is the prompt's; the content and its end-of-text the reply's.
                reply = m["role"] == "assistant" and target
                mask += [False] + [reply] * (len(piece) - 1)
            return ids, mask
        # A template is text: find each reply's characters as the difference between the
        # conversation rendered up to its prompt and up to its end, then mark the tokens there.
        full = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, (m, target) in enumerate(zip(messages, targets, strict=True)):
            if m["role"] != "assistant" or not target:
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise KimbhoError(
                    "the chat template does not render a conversation as the prefix of its longer "
                    "self, so the replies cannot be found in it; fine-tune with a template that does"
                )
            spans.append((len(before), len(through)))
        # `encode_batch`, not `_fast`: the fast call leaves the offsets out.
        encoding = self._special_encoder.encode_batch([full], add_special_tokens=False)[0]
        mask = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
        return encoding.ids, mask

    def _role_message(self, message: dict[str, Any]) -> list[int]:
        """The default format's message: its role token, its content, end-of-text."""
        if message["role"] not in self._role_ids:
            raise KimbhoError(f"role {message['role']!r} is not one of {', '.join(ROLES)}")
        eot = self.tokenizer.eot_id
        assert eot is not None  # checked when the format was made
        return [self._role_ids[message["role"]], *self.tokenizer.encode(message["content"]), eot]

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The template's text for `messages`."""
        from jinja2 import TemplateError

        special = {t.content: t.content for t in self.tokenizer.inner.get_added_tokens_decoder().values()}
        pieces, size = [], 0
        try:
            # Rendered piece by piece, so a template that writes without end stops at the bound
            # rather than when memory runs out.
            for piece in self._compiled.generate(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=_first(special, ("<s>", "<|begin_of_text|>", "<bos>")),
                eos_token=_first(special, _EOT_NAMES),
            ):
                pieces.append(piece)
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise KimbhoError(
                        f"the chat template rendered more than {MAX_RENDERED_CHARS:,} characters for these messages"
                    )
        except KimbhoError:
            raise
        except TemplateError as e:  # SecurityError, UndefinedError and raise_exception among them
            raise KimbhoError(f"the chat template refused the messages: {e}") from None
        except Exception as e:  # templates ship with imported models: any bug of theirs is named
            raise KimbhoError(f"the model's chat template failed ({type(e).__name__}: {e})") from None
        return "".join(pieces)


def read_chat_template(model_dir: Path) -> str | None:
    """A Hugging Face directory's chat template: `chat_template.jinja`, else the `chat_template`
    of `tokenizer_config.json` (a string, or a list of named templates of which "default" is used)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise KimbhoError(f"{config} is not a valid JSON object") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise KimbhoError(f"{config}: chat_template must be a string or a list of named templates")
    return template


def _sandbox() -> Any:
    """Jinja's immutable sandbox, made strict: reaching for an unsafe attribute (`__class__`,
    `__globals__`, ...) fails the render instead of quietly printing nothing, so a hostile
    template is refused rather than half-rendered."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class StrictSandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    return StrictSandbox(trim_blocks=True, lstrip_blocks=True)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


def _first(present: dict[str, str], names: Sequence[str]) -> str:
    return next((present[n] for n in names if n in present), "")
