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

_EXPORTS = {  # name -> the module that defines it
    "load": "loading",
    "KimbhoConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "RandomWindowSampler": "data.shards",
    "TokenDataset": "data.shards",
    "TokenStream": "data.shards",
    "prepare": "data.prepare",
    "KimbhoError": "errors",
    "evaluate": "evaluation",
    "Engine": "inference.engine",
    "Request": "inference.engine",
    "SamplingParams": "inference.sampling",
    "generate": "inference.generation",
    "generate_batch": "inference.generation",
    "stream": "inference.generation",
    "DecoderLanguageModel": "model",
    "KimbhoV1Model": "model",
    "Tokenizer": "data.tokenizer",
    "Trainer": "training.trainer",
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
    from .config import KimbhoConfig, RunConfig, TrainConfig
    from .data.prepare import prepare
    from .data.shards import RandomWindowSampler, TokenDataset, TokenStream
    from .data.tokenizer import Tokenizer
    from .errors import KimbhoError
    from .evaluation import evaluate
    from .inference.engine import Engine, Request
    from .inference.generation import generate, generate_batch, stream
    from .inference.sampling import SamplingParams
    from .loading import load
    from .model import DecoderLanguageModel, KimbhoV1Model
    from .training.trainer import Trainer
