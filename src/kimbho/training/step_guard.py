"""Skip optimizer steps that would poison the weights.

A NaN or Inf loss or gradient norm is never applied: one such step would turn every weight and
Adam moment into NaN for good. Optionally (`train.skip_spikes`), a step whose loss or gradient
norm is far above its recent mean is skipped too: the batch is dropped rather than letting it
throw the model off course (PaLM likewise skipped the data batches around its loss spikes). The trainer stops the run after
`train.max_skipped_steps` skips in a row, since by then something is broken (learning rate, data)
and skipping more would only burn compute.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

SPIKE_WINDOW = 50  # accepted steps the rolling means cover
SPIKE_WARMUP = 10  # accepted steps needed before anything counts as a spike


class StepGuard:
    """Decides, from a step's loss and gradient norm, whether the optimizer may apply it."""

    def __init__(self, spike_factor: float = 0.0) -> None:
        self.spike_factor = spike_factor
        self.recent: deque[tuple[float, float]] = deque(maxlen=SPIKE_WINDOW)
        self.consecutive = 0  # skips in a row, up to the last step checked
        self.last_reason: str | None = None  # why the last step checked was skipped (None: applied)

    def allows(self, loss: float, grad_norm: float) -> bool:
        """True if the step may be applied; otherwise `last_reason` says why not."""
        self.last_reason = self._reason(loss, grad_norm)
        if self.last_reason is not None:
            self.consecutive += 1
            return False
        self.consecutive = 0
        self.recent.append((loss, grad_norm))
        return True

    def _reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.spike_factor > 0 and len(self.recent) >= SPIKE_WARMUP:
            for name, value, index in (("loss", loss, 0), ("gradient norm", grad_norm, 1)):
                mean = sum(r[index] for r in self.recent) / len(self.recent)
                if value > self.spike_factor * mean:
                    return (
                        f"{name} spike ({value:.4g}, {value / mean:.1f}x the mean of the last "
                        f"{len(self.recent)} steps)"
                    )
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and ints, so it travels in a `weights_only` checkpoint."""
        return {"recent": [list(r) for r in self.recent], "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((tuple(r) for r in state["recent"]), maxlen=SPIKE_WINDOW)
        self.consecutive = int(state["consecutive"])
        self.last_reason = None
