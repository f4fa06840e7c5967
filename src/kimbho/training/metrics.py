"""Where training numbers go: `metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics of a run. Every record is flushed at once, so a crash loses nothing.

    `resume_step`: continue a run resumed from the checkpoint of that step. Records after it (written
    by the interrupted process, which the resumed run is about to redo) are dropped, as is a line
    cut short by a crash, so the file holds one curve; TensorBoard purges its events the same way."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            _drop_records_after(self.path, resume_step)
        self._file = self.path.open("w" if resume_step is None else "a")
        # Imported here: TensorBoard pulls in a lot, and only training needs it.
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, dict):  # by_source: {"web": {"val_bpb": ...}} -> eval/val_bpb/web
                for group, inner in value.items():
                    for key, number in inner.items():
                        self._tb.add_scalar(f"{kind}/{key}/{group}", number, step)
            elif isinstance(value, str):
                self._tb.add_text(f"{kind}/{name}", value, step)
            elif isinstance(value, (int, float)) and name not in ("step",):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class DiscardedMetrics:
    """The metrics of a process other than rank 0 in a multi-process run: rank 0 writes the run's."""

    def write(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, optionally only those of one kind."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _drop_records_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a process killed while writing it
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
