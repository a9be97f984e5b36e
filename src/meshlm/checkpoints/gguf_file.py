"""GGUF files (llama.cpp's format) through the `gguf` package: metadata -> ModelConfig, tensors
dequantized to float32 on load (gguf.quants.dequantize), tokenizer and chat template from the
file's metadata.

llama.cpp's converter permutes the rows of attn_q / attn_k of Llama-family models so that its
RoPE can rotate adjacent pairs; `unpermute_rope` undoes it, giving back Hugging Face's row order,
so the model runs with rope_style "half" exactly like the safetensors checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meshlm.checkpoints.assemble import Placer, Recipe, assemble
from meshlm.config import ModelConfig
from meshlm.errors import MeshlmError

# Llama 2/3, Mistral and SmolLM2 are all written as "llama" by llama.cpp (Q/K rows permuted);
# "qwen2" adds QKV biases and keeps Hugging Face's row order.
SUPPORTED_ARCHS = ("llama", "qwen2")


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows [n, D/2, 2] (pairs) -> [n, 2, D/2] (halves)."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufFile:
    """Metadata (`meta`: plain Python values) and dequantized tensors of one .gguf file."""

    def __init__(self, path: Path):
        import gguf
        if not path.is_file():
            raise MeshlmError(f"model file {path} does not exist")
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
            self.meta: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        except MeshlmError:
            raise
        except Exception as e:  # truncated or malformed: the gguf package raises many kinds
            raise MeshlmError(f"corrupted GGUF file {path}: {type(e).__name__}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` dequantized to float32, in torch order [out, in], checked against `shape`."""
        import gguf
        t = self.tensors.get(name)
        if t is None:
            raise MeshlmError(f"GGUF file {self.path} lacks the tensor {name!r}")
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise MeshlmError(f"cannot dequantize {name} ({t.tensor_type.name}) from {self.path}: {e}") from None
        a = np.asarray(a, dtype=np.float32)
        if a.shape != shape:
            raise MeshlmError(f"GGUF {self.path}: tensor {name} has shape {list(a.shape)}, its metadata implies "
                              f"{list(shape)}")
        return a

    def config(self) -> ModelConfig:
        m = self.meta
        arch = m.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise MeshlmError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
        try:
            E, H = int(m[f"{arch}.embedding_length"]), int(m[f"{arch}.attention.head_count"])
            vocab = len(m["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in m else int(m[f"{arch}.vocab_size"])
            return ModelConfig(
                name=str(m.get("general.name") or self.path.stem), n_layers=int(m[f"{arch}.block_count"]), d_model=E,
                d_ff=int(m[f"{arch}.feed_forward_length"]), n_heads=H,
                n_kv_heads=int(m.get(f"{arch}.attention.head_count_kv", H)),
                d_head=int(m.get(f"{arch}.attention.key_length", E // H)), vocab=vocab, block="serial",
                gated_mlp=True, activation="silu", norm="rmsnorm",
                norm_eps=float(m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(m.get(f"{arch}.rope.freq_base", 10000.0)), rope_style="half",
                qkv_bias=arch == "qwen2", tie_embeddings="output.weight" not in self.tensors,
                max_seq_len=int(m.get(f"{arch}.context_length", 2048)), extra={"model_type": f"gguf-{arch}"})
        except KeyError as e:
            raise MeshlmError(f"GGUF {self.path} lacks the metadata key {e.args[0]!r}") from None


def _recipes(f: GgufFile, c: ModelConfig, permuted: bool) -> dict[str, Recipe]:
    E, F, H, K, D, V = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.d_head, c.vocab
    b = "blk.{i}."

    def rows(a: np.ndarray, n: int) -> np.ndarray:  # Q/K rows (weights or biases) in HF order
        return unpermute_rope(a, n) if permuted else a

    def w(name: str, shape: tuple[int, int]) -> Recipe:
        return lambda i: f.get(name.format(i=i), shape).T
    return {
        "embed": lambda _: f.get("token_embd.weight", (V, E)),
        "lm_head": lambda _: f.get("output.weight", (V, E)).T,
        "final_norm/scale": lambda _: f.get("output_norm.weight", (E,)),
        "layers/attn_norm/scale": lambda i: f.get(f"blk.{i}.attn_norm.weight", (E,)),
        "layers/mlp_norm/scale": lambda i: f.get(f"blk.{i}.ffn_norm.weight", (E,)),
        "layers/wq": lambda i: rows(f.get(f"blk.{i}.attn_q.weight", (H * D, E)), H).T.reshape(E, H, D),
        "layers/wk": lambda i: rows(f.get(f"blk.{i}.attn_k.weight", (K * D, E)), K).T.reshape(E, K, D),
        "layers/bq": lambda i: rows(f.get(f"blk.{i}.attn_q.bias", (H * D,)), H).reshape(H, D),
        "layers/bk": lambda i: rows(f.get(f"blk.{i}.attn_k.bias", (K * D,)), K).reshape(K, D),
        "layers/bv": lambda i: f.get(f"blk.{i}.attn_v.bias", (K * D,)).reshape(K, D),
        "layers/wv": lambda i: f.get(f"blk.{i}.attn_v.weight", (K * D, E)).T.reshape(E, K, D),
        "layers/wo": lambda i: f.get(f"blk.{i}.attn_output.weight", (E, H * D)).T.reshape(H, D, E),
        "layers/w_gate": w(b + "ffn_gate.weight", (F, E)),
        "layers/w_up": w(b + "ffn_up.weight", (F, E)),
        "layers/w_out": w(b + "ffn_down.weight", (E, F)),
    }


def load_gguf(path: str | Path, place: Placer, *, progress: bool = True,
              file: GgufFile | None = None) -> tuple[ModelConfig, dict, GgufFile]:
    """(cfg, params, the open file: its `meta` feeds `Tokenizer.from_gguf`)."""
    f = file or GgufFile(Path(path))
    cfg = f.config()
    permuted = f.meta.get("general.architecture") == "llama"
    params = assemble(cfg, _recipes(f, cfg, permuted), place, source=str(path), progress=progress)
    return cfg, params, f
