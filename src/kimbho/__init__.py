"""Kimbho: from a folder of text to a trained, served Llama-style language model.

    import kimbho
    model, tokenizer = kimbho.load("runs/demo")
    for piece in kimbho.stream(model, tokenizer, "The assert statement", max_new_tokens=64):
        print(piece, end="")

The names below are imported on first use, so `import kimbho` and `kimbho --help` stay fast
(PyTorch alone takes over a second to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "checkpoint",
    "KimbhoConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "RandomWindowSampler": "data",
    "TokenDataset": "data",
    "TokenStream": "data",
    "prepare": "data",
    "KimbhoError": "errors",
    "evaluate": "evaluation",
    "Engine": "engine",
    "Request": "engine",
    "SamplingParams": "sampling",
    "generate": "generation",
    "generate_batch": "generation",
    "stream": "generation",
    "DecoderLanguageModel": "model",
    "KimbhoV1Model": "model",
    "Tokenizer": "tokenizer",
    "Trainer": "train",
}

__all__ = [
    "DecoderLanguageModel",
    "Engine",
    "KimbhoConfig",
    "KimbhoError",
    "KimbhoV1Model",
    "RandomWindowSampler",
    "Request",
    "RunConfig",
    "SamplingParams",
    "TokenDataset",
    "TokenStream",
    "Tokenizer",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "generate",
    "generate_batch",
    "load",
    "prepare",
    "stream",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kimbho' has no attribute {name!r}")


if TYPE_CHECKING:
    from .checkpoint import load
    from .config import KimbhoConfig, RunConfig, TrainConfig
    from .data import RandomWindowSampler, TokenDataset, TokenStream, prepare
    from .engine import Engine, Request
    from .errors import KimbhoError
    from .evaluation import evaluate
    from .generation import generate, generate_batch, stream
    from .model import DecoderLanguageModel, KimbhoV1Model
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer
    from .train import Trainer
