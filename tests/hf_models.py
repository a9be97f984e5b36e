"""Tiny random Hugging Face models, created offline from configs and saved as safetensors (tests only)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

# Each entry: (config class, kwargs). Sizes are tiny but exercise GQA/MQA, biases, partial rotary,
# fused QKV orders, parallel blocks with one or two norms, and untied heads.
_COMMON = dict(vocab_size=96, max_position_embeddings=128)
ARCHS: dict[str, tuple[type, dict]] = {
    "llama": (tf.LlamaConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False)),
    "mistral": (tf.MistralConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": (tf.Qwen2Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)),
    "falcon-7b": (tf.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                        bias=False, alibi=False)),
    "falcon-40b": (tf.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                         num_kv_heads=2, new_decoder_architecture=True, bias=False, alibi=False)),
    "gpt-neox": (tf.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True)),
    "gpt-j": (tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)),
}


def make_hf_model(arch: str, directory: Path, seed: int = 0) -> tf.PreTrainedModel:
    """Create the tiny random model `arch`, save it (config.json + safetensors) under `directory`."""
    cls, kw = ARCHS[arch]
    cfg = cls(**(_COMMON | kw))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF inits norms to 1/0 and some biases to 0: randomize all so mappings are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model
