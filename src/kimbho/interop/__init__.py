"""Adapters between Kimbho and the formats the rest of the ecosystem runs: one module per format,
each holding that format's whole key map (`hf`: Hugging Face `LlamaForCausalLM` directories,
`gguf`: llama.cpp's single-file format). `output` writes their results atomically."""
