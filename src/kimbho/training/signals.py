"""Stop training cleanly on SIGTERM or SIGINT: finish the step, save a checkpoint, exit 0.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some time before SIGKILL; Ctrl-C
sends SIGINT. Either one only raises a flag that the training loop reads after each step, so the
step in flight and any save in progress complete. A second Ctrl-C interrupts at once, for a user
who does not want to wait; the checkpoints on disk stay complete either way.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("kimbho")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT set `signal_name` instead of ending the process.

    Signal handlers can only be installed from the main thread; elsewhere (a trainer run in a
    worker thread) this does nothing and signals keep their usual effect."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning(
                f"received {self.signal_name}: finishing this step, then saving a checkpoint and stopping "
                f"(Ctrl-C again stops at once, without saving)"
            )
