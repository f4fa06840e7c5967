"""How far a run has come (`Progress`, saved with every checkpoint), its wall clock, and when
periodic work is due."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """How far the run has come; saved with every checkpoint."""

    step: int = 0  # optimizer steps done, which is also the data position: the next batch is `step`
    tokens_seen: int = 0
    elapsed_sec: float = 0.0
    skipped_steps: int = 0  # steps whose update the guard refused (NaN/Inf, spikes)
    best_val_loss: float | None = None  # of checkpoints/best/
    # Losses of the steps since the last train record: saved, so that a resumed run's next
    # record averages the same steps as the uninterrupted run's.
    interval_losses: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "interval_losses": list(self.interval_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(Progress(**state).state_dict())  # fields it does not know are an error


class Clock:
    """Wall-clock time of a training session: the run's elapsed seconds (carried over a resume)
    and the current logging interval's (for tokens/s)."""

    def __init__(self, elapsed_before: float) -> None:
        self.session_start = self.interval_start = time.perf_counter()
        self.elapsed_before = elapsed_before
        self.steps = 0  # steps in the current interval

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def interval(self) -> float:
        return time.perf_counter() - self.interval_start

    def restart_interval(self) -> None:
        self.interval_start, self.steps = time.perf_counter(), 0


def due(done: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due after step `done`."""
    return bool(every and done % every == 0) or done == last


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity: a non-finite number is recorded as null."""
    return value if math.isfinite(value) else None
