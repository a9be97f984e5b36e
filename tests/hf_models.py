"""Tiny random Hugging Face models, created offline from configs and saved as safetensors (tests only)."""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import tokenizers
import torch
import transformers as tf
from tokenizers import decoders, models, pre_tokenizers, trainers

# Each entry: (config class, kwargs). Sizes are tiny but exercise GQA/MQA, biases, partial rotary,
# fused QKV orders, parallel blocks with one or two norms, and untied heads.
_COMMON = dict(vocab_size=320, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
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
    """Create the tiny random model `arch`, save it (config.json, safetensors, tokenizer) under `directory`."""
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
    save_tokenizer(directory)
    return model


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The capital of France is Paris.", "Once upon a time there was a tiny model.", "1234 + 5678 = 6912",
          "héllo wörld — ünïcode 東京 ✓", "def f(x):\n    return x * 2\n"] * 20


def train_tokenizer(vocab_size: int = 320) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style) trained in-process in milliseconds; ids 0-2 are special."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_tokenizer(directory: Path, vocab_size: int = 320) -> tokenizers.Tokenizer:
    tok = train_tokenizer(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return tok


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to attn_q/attn_k rows (LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: tf.PreTrainedModel, tok: tokenizers.Tokenizer, path: Path, quant: str = "F32") -> None:
    """Write an HF Llama (or Qwen2) model as llama.cpp would: GGUF names, Q/K rows permuted for
    llama (not qwen2), BPE tokenizer, chat template."""
    import gguf
    c = model.config
    H, K = c.num_attention_heads, c.num_key_value_heads
    arch = "qwen2" if c.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{per_layer[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                a = llama_cpp_permute(a, H)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                a = llama_cpp_permute(a, K)
        else:
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue  # tied: the checkpoint has no separate output matrix
            gname = names[name]
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
