"""Adapters between Kimbho and the formats the rest of the ecosystem runs: one module per format,
each holding that format's whole key map (`hf`: Hugging Face `LlamaForCausalLM` directories,
`gguf`: llama.cpp's single-file format) over the shared helpers of `keymap`. Their files are
written atomically (`storage/staging.py`)."""
