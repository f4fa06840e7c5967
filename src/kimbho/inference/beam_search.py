"""Beam search over the slots of an `Engine`: one slot per beam, reordered in place each step.

Scores are sums of the model's log-probabilities; a finished hypothesis is ranked by
`logprob / new_tokens ** length_penalty` (Wu et al. 2016, as in Hugging Face): above 0 favours
longer outputs, below 0 shorter ones. `early_stopping=True` stops once `num_beams` hypotheses
have finished; False (Hugging Face's default heuristic) stops once no running beam can beat the
worst of them at its current length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import KimbhoError
from .engine import Engine


@dataclass
class Hypothesis:
    tokens: list[int]  # the new tokens, ending with the end-of-text token if it finished
    logprob: float  # sum of the model's log-probabilities of `tokens`

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(len(self.tokens), 1) ** length_penalty


@torch.inference_mode()
def beam_search(
    engine: Engine,
    prompt: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
) -> Hypothesis:
    """The best continuation of `prompt` among `num_beams` beams, using slots 0..num_beams-1 of
    an idle `engine`."""
    if num_beams < 1:
        raise KimbhoError(f"num_beams must be >= 1, got {num_beams}")
    if engine.busy or engine.slots < num_beams:
        raise KimbhoError(f"beam search needs an idle engine with at least {num_beams} slots")
    engine.check_fits(len(prompt), max_new_tokens)
    if max_new_tokens == 0:
        return Hypothesis([], 0.0)
    logits = engine.prefill(0, [prompt])  # (1, vocab): one beam until the first step
    vocab = logits.shape[-1]
    beams = [Hypothesis([], 0.0)]
    finished: list[Hypothesis] = []
    for step in range(max_new_tokens):
        scores = torch.tensor([b.logprob for b in beams], device=logits.device)
        totals = torch.log_softmax(logits, dim=-1) + scores[:, None]
        # 2 * num_beams candidates: enough to keep num_beams running even if half end here.
        values, flat = totals.view(-1).topk(min(2 * num_beams, totals.numel()))
        running, parents = [], []
        for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            hypothesis = Hypothesis([*beams[parent].tokens, token], value)
            if token == eos_token_id:
                if rank < num_beams:  # an ending only counts if it ranks among the beams
                    finished.append(hypothesis)
                continue
            running.append(hypothesis)
            parents.append(parent)
            if len(running) == num_beams:
                break
        finished = sorted(finished, key=lambda h: h.score(length_penalty), reverse=True)[:num_beams]
        beams = running
        if (
            not running
            or step == max_new_tokens - 1
            or _done(finished, running, num_beams, length_penalty, early_stopping)
        ):
            break
        moved = [(parent, slot) for slot, parent in enumerate(parents) if parent != slot]
        if moved:  # beams that stay in their slot keep their cache as it is
            engine.copy_slots(*map(list, zip(*moved, strict=True)))
        logits = engine.decode(range(len(running)), [b.tokens[-1] for b in running])
    return max(finished + beams, key=lambda h: h.score(length_penalty))


def _done(
    finished: list[Hypothesis],
    running: list[Hypothesis],
    num_beams: int,
    length_penalty: float,
    early_stopping: bool,
) -> bool:
    if len(finished) < num_beams:
        return False
    if early_stopping:
        return True
    best_running = max(h.score(length_penalty) for h in running)
    return finished[-1].score(length_penalty) >= best_running
