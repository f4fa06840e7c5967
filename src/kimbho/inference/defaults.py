"""Inference settings shared by every entry point, in a module that imports nothing, so the
command line can show them in `--help` without importing PyTorch."""

# How Kimbho samples when the caller says nothing: the CLI, the server, the demo, the trainer's
# sample texts and the generation_config of a Hugging Face export all read these (the Python
# API's generate/stream default to greedy, temperature 0, as documented).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95

# CTRL's penalty divides or multiplies logits by it; below 0.01 they overflow (a denormal penalty
# gave infinities, then NaN). The HTTP API takes the same range.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0

# `--dtype` of the inference commands (weights for inference; see `device.pick_inference_dtype`;
# int8 is weight-only quantization, `model/quantize.py`). A written file takes the float ones only.
INFERENCE_DTYPES = ("auto", "fp32", "bf16", "int8")
FILE_DTYPES = ("auto", "fp32", "bf16")
