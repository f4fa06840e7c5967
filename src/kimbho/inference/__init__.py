"""Generation: the engine (slots of one KV cache, continuous batching, compiled step), sampling,
beam search, the callers' API (`generation`) and chat formats."""
