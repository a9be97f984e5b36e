"""Checkpoint loaders: Hugging Face safetensors directories and GGUF files -> (ModelConfig, params, tokenizer)."""
