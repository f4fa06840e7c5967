"""Every random generator a training step draws from (torch, CUDA, NumPy, Python): its state as
tensors and plain lists, so a checkpoint can hold it and `torch.load(weights_only=True)` read it
back, and the seed of each process's own stream."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def process_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for the random stream (dropout) of process `rank`, distinct for each process."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
