"""The model: the Llama-style decoder (`transformer.py`) and its fused output-projection loss
(`loss.py`), which `KimbhoV1Model.forward(input_ids, targets)` computes."""

from .transformer import DecoderLanguageModel, KimbhoV1Model, KVCache

__all__ = ["DecoderLanguageModel", "KVCache", "KimbhoV1Model"]
