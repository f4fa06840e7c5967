"""Where training numbers go: `metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics of a run. Every record is flushed at once, so a crash loses nothing."""

    def __init__(self, run_dir: Path, append: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w")
        # Imported here: TensorBoard pulls in a lot, and only training needs it.
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, str):
                self._tb.add_text(f"{kind}/{name}", value, step)
            elif isinstance(value, (int, float)) and name not in ("step",):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, optionally only those of one kind."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
