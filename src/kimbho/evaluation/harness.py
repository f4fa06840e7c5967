"""Kimbho as a model of EleutherAI's lm-evaluation-harness (the `kimbho[eval]` extra).

    kimbho-lm-eval run --model kimbho --model_args pretrained=RUN_DIR --include_path TASKS/ --tasks NAME

`kimbho-lm-eval` is lm-eval's own command line with the model type `kimbho` registered: lm-eval
0.4 finds models only in its own table, with no plugin discovery, so a plain `lm_eval` does not
know it. From Python, importing this module registers it (`lm_eval.simple_evaluate(model="kimbho",
...)`), or pass `KimbhoLM(...)` itself as the model.

The three request kinds run on Kimbho's own scoring and generation: `loglikelihood` through the
packed scorer of `kimbho eval --task` (every request of a task in as few forward passes as fit,
so lm-eval's `batch_size` is accepted and not needed), `loglikelihood_rolling` over lm-eval's
disjoint windows of the model's context (as its `hf` model computes it), `generate_until`
through the engine, all requests decoded together. `model_args`: `pretrained` (any MODEL),
`device` and `dtype` (as the `kimbho` commands take them), `max_gen_toks`, and `max_length`
(tokens of context lm-eval plans with; default the model's, as for `hf`).
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  # lm-eval's own models first: registering before them hides them
import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..errors import KimbhoError
from .tasks import score_continuations

log = logging.getLogger("kimbho")

MAX_GEN_TOKS = 256  # lm-eval's `hf` model's default, so both generate alike


@register_model("kimbho")
class KimbhoLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        max_gen_toks: int | str = MAX_GEN_TOKS,
        max_length: int | str | None = None,
        batch_size: int | str | None = None,  # accepted for lm-eval's command line; packing sizes batches
        max_batch_size: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        from ..loading import load

        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; its `hf` model then
            # runs on the CPU, and so does this one (saying so).
            log.warning(f"lm-eval asks for device {device}, but PyTorch sees no CUDA GPU: using the CPU")
            device = "cpu"
        self.model, self.tokenizer = load(pretrained, device=device or "auto", dtype=dtype)
        if self.tokenizer.eot_id is None:
            raise KimbhoError(f"{pretrained}: the tokenizer has no end-of-text token to begin a text with")
        self.max_length = int(max_length) if max_length is not None else self.model.config.max_seq_len
        if not 1 < self.max_length <= self.model.config.max_seq_len:
            raise KimbhoError(
                f"max_length={self.max_length}: give 2 to the model's context of {self.model.config.max_seq_len}"
            )
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        assert self.tokenizer.eot_id is not None
        return self.tokenizer.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: object) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: object,
    ) -> list[tuple[float, bool]]:
        limit = self.max_length + 1
        pairs = []
        for (_, continuation), ctx, cont in requests:
            if len(cont) > self.max_length:
                raise KimbhoError(
                    f"a continuation of {len(cont)} tokens does not fit the model's context of {self.max_length} "
                    f"with a token before it ({continuation[:40]!r})"
                )
            # The context's oldest tokens give way, as lm-eval's `hf` model truncates on the left.
            pairs.append((ctx[max(0, len(ctx) + len(cont) - limit) :], cont))
        with tqdm(total=len(pairs), desc="kimbho loglikelihood", disable=disable_tqdm, delay=1) as bar:
            return score_continuations(self.model, pairs, bar.update)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[tuple[str, str], list[int], list[int]]] = []
        owners: list[int] = []
        for n, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((("", ""), ctx, cont))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (value, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += value
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from ..inference.engine import Engine, Request
        from ..inference.generation import MAX_SLOTS
        from ..inference.sampling import SamplingParams

        engine_requests = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - budget) :] if budget < self.max_length else []
            if not ids:
                raise KimbhoError(
                    f"max_gen_toks={budget} leaves no room for a prompt in the model's context of {self.max_length}"
                )
            engine_requests.append(
                Request(
                    ids,
                    budget,
                    SamplingParams(temperature=temperature),
                    seed=0,
                    stop_token_ids=(self.eot_token_id,),
                    stop=tuple(s for s in until if s),
                )
            )
        replies = [""] * len(requests)
        engine = Engine(self.model, self.tokenizer, slots=min(max(len(requests), 1), MAX_SLOTS))
        with tqdm(total=len(requests), desc="kimbho generate_until", disable=disable_tqdm, delay=1) as bar:
            for event in engine.run(engine_requests):
                replies[event.request_id] += event.text
                if event.finish_reason is not None:
                    bar.update(1)
        for request, reply in zip(requests, replies, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, reply)
        return replies


def main() -> None:
    """`kimbho-lm-eval`: lm-eval's command line, with `--model kimbho` known."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
