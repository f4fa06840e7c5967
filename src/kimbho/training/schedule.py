"""Learning-rate schedules: linear warm-up, then cosine, warm-up-stable-decay (WSD) or constant."""

from __future__ import annotations

import math

from ..config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, then cosine decay
    to `lr * min_lr_ratio` at `max_steps`; or, for `wsd`, hold `lr` and decay linearly over the
    last `decay_fraction` of the run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, int(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
