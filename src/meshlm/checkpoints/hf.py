"""Hugging Face checkpoint directories: config.json + *.safetensors (single or sharded index).

Each supported architecture maps its tensor names onto the canonical params tree (see
`meshlm.checkpoints.assemble`). Torch `Linear` weights are stored [out, in]; the canonical tree
stores [in, out] split into heads, e.g. q_proj [H*D, E] -> wq [E, H, D]. Fused QKV projections
come in three row orders, undone by `split_qkv`:
  "per_head": [H, 3, D]        GPT-NeoX, Falcon without multi-query
  "mqa":      [H + 2, D]       Falcon-7B (multi_query: H query heads, then 1 key, 1 value)
  "grouped":  [K, H/K + 2, D]  Falcon-40B (new_decoder_architecture: per KV group, its queries, key, value)
No pickle and no remote code: only config.json and safetensors are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meshlm.checkpoints.assemble import Placer, Recipe, assemble
from meshlm.checkpoints.safetensors_file import SafetensorsCheckpoint
from meshlm.config import ModelConfig, load_model_config
from meshlm.errors import MeshlmError


def read_config(directory: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the raw config.json dict): the raw dict names the fused-QKV order and norms."""
    if not (directory / "config.json").is_file():
        raise MeshlmError(f"{directory} has no config.json (not a Hugging Face checkpoint directory)")
    cfg = load_model_config(str(directory))  # validates the JSON and the architecture
    return cfg, json.loads((directory / "config.json").read_text())


def split_qkv(w: np.ndarray, order: str, H: int, K: int, D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused [(H + 2K) * D, ...] rows -> q [H*D, ...], k [K*D, ...], v [K*D, ...] (rows head-major)."""
    rest = w.shape[1:]
    if order == "per_head":
        t = w.reshape(H, 3, D, *rest)
        q, k, v = t[:, 0], t[:, 1], t[:, 2]
    elif order == "mqa":
        t = w.reshape(H + 2, D, *rest)
        q, k, v = t[:H], t[H:H + 1], t[H + 1:]
    elif order == "grouped":
        t = w.reshape(K, H // K + 2, D, *rest)
        q, k, v = t[:, :-2], t[:, -2], t[:, -1]
    else:
        raise ValueError(order)
    return q.reshape(H * D, *rest), k.reshape(K * D, *rest), v.reshape(K * D, *rest)


class _Reader:
    """Shape-checked access to the checkpoint's tensors, as float32."""

    def __init__(self, ckpt: SafetensorsCheckpoint, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = self.ckpt.get(name)
        if a.shape != shape:
            raise MeshlmError(f"{self.ckpt.dir}: tensor {name} has shape {list(a.shape)}, but config.json "
                              f"implies {list(shape)}")
        return a.astype(np.float32)


def _attn_recipes(r: _Reader, qkv: Callable[[int, str], np.ndarray], out: str, out_bias: str | None,
                  qkv_bias: Callable[[int, str], np.ndarray] | None) -> dict[str, Recipe]:
    """wq/wk/wv/wo (+ biases) from per-layer projection getters: qkv(i, 'q') -> [n*D, E]."""
    c = r.cfg
    E, H, K, D = c.d_model, c.n_heads, c.n_kv_heads, c.d_head
    rec: dict[str, Recipe] = {
        "layers/wq": lambda i: qkv(i, "q").T.reshape(E, H, D),
        "layers/wk": lambda i: qkv(i, "k").T.reshape(E, K, D),
        "layers/wv": lambda i: qkv(i, "v").T.reshape(E, K, D),
        "layers/wo": lambda i: r(out.format(i=i), (E, H * D)).T.reshape(H, D, E),
    }
    if c.qkv_bias and qkv_bias is not None:
        rec["layers/bq"] = lambda i: qkv_bias(i, "q").reshape(H, D)
        rec["layers/bk"] = lambda i: qkv_bias(i, "k").reshape(K, D)
        rec["layers/bv"] = lambda i: qkv_bias(i, "v").reshape(K, D)
    if c.out_bias and out_bias:
        rec["layers/bo"] = lambda i: r(out_bias.format(i=i), (E,))
    return rec


def _linear_recipes(r: _Reader, names: dict[str, str], bias: bool) -> dict[str, Recipe]:
    """MLP weights: canonical leaf -> torch Linear name pattern ('...{i}...', without .weight)."""
    c = r.cfg
    E, F = c.d_model, c.d_ff
    rec: dict[str, Recipe] = {}
    for leaf, name in names.items():
        n_out, n_in = (E, F) if leaf == "w_out" else (F, E)
        rec[f"layers/{leaf}"] = lambda i, n=name, s=(n_out, n_in): r(f"{n.format(i=i)}.weight", s).T
        if bias:
            rec[f"layers/b{leaf[1:]}"] = lambda i, n=name, s=(n_out,): r(f"{n.format(i=i)}.bias", s)
    return rec


def _norm_recipes(r: _Reader, names: dict[str, str]) -> dict[str, Recipe]:
    """Norms: canonical leaf ('final_norm', 'layers/attn_norm', ...) -> HF module name pattern."""
    E = r.cfg.d_model
    rec: dict[str, Recipe] = {}
    for leaf, name in names.items():
        rec[f"{leaf}/scale"] = lambda i, n=name: r(f"{n.format(i=i)}.weight", (E,))
        rec[f"{leaf}/bias"] = lambda i, n=name: r(f"{n.format(i=i)}.bias", (E,))
    return rec


def _fused(r: _Reader, name: str, order: str, n_rows_suffix: str) -> Callable[[int, str], np.ndarray]:
    c = r.cfg
    H, K, D, E = c.n_heads, c.n_kv_heads, c.d_head, c.d_model
    shape = ((H + 2 * K) * D, E) if n_rows_suffix == "weight" else ((H + 2 * K) * D,)

    def get(i: int, which: str) -> np.ndarray:
        q, k, v = split_qkv(r(f"{name.format(i=i)}.{n_rows_suffix}", shape), order, H, K, D)
        return {"q": q, "k": k, "v": v}[which]
    return get


def _recipes(r: _Reader, mt: str, hf: dict) -> dict[str, Recipe]:
    c = r.cfg
    E, V, H, K, D = c.d_model, c.vocab, c.n_heads, c.n_kv_heads, c.d_head
    sizes = {"q": H * D, "k": K * D, "v": K * D}
    if mt in ("llama", "mistral", "qwen2"):
        p = "model.layers.{i}."
        rec = _attn_recipes(r, lambda i, w: r(f"{p.format(i=i)}self_attn.{w}_proj.weight", (sizes[w], E)),
                            p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias",
                            lambda i, w: r(f"{p.format(i=i)}self_attn.{w}_proj.bias", (sizes[w],)))
        rec |= _linear_recipes(r, {"w_gate": p + "mlp.gate_proj", "w_up": p + "mlp.up_proj",
                                   "w_out": p + "mlp.down_proj"}, c.mlp_bias)
        rec |= _norm_recipes(r, {"layers/attn_norm": p + "input_layernorm", "layers/mlp_norm": p +
                                 "post_attention_layernorm", "final_norm": "model.norm"})
        embed, head = "model.embed_tokens.weight", "lm_head"
    elif mt == "falcon":
        p = "transformer.h.{i}."
        new = bool(hf.get("new_decoder_architecture", False))
        order = "grouped" if new else ("mqa" if hf.get("multi_query", True) else "per_head")
        qkv = p + "self_attention.query_key_value"
        rec = _attn_recipes(r, _fused(r, qkv, order, "weight"), p + "self_attention.dense.weight",
                            p + "self_attention.dense.bias", _fused(r, qkv, order, "bias"))
        rec |= _linear_recipes(r, {"w_in": p + "mlp.dense_h_to_4h", "w_out": p + "mlp.dense_4h_to_h"}, c.mlp_bias)
        if new and c.parallel_norms == 2:
            norms = {"layers/attn_norm": p + "ln_attn", "layers/mlp_norm": p + "ln_mlp"}
        else:
            norms = {"layers/attn_norm": p + "input_layernorm", "layers/mlp_norm": p + "post_attention_layernorm"}
        rec |= _norm_recipes(r, norms | {"final_norm": "transformer.ln_f"})
        embed, head = "transformer.word_embeddings.weight", "lm_head"
    elif mt == "gpt_neox":
        p = "gpt_neox.layers.{i}."
        qkv = p + "attention.query_key_value"
        rec = _attn_recipes(r, _fused(r, qkv, "per_head", "weight"), p + "attention.dense.weight",
                            p + "attention.dense.bias", _fused(r, qkv, "per_head", "bias"))
        rec |= _linear_recipes(r, {"w_in": p + "mlp.dense_h_to_4h", "w_out": p + "mlp.dense_4h_to_h"}, c.mlp_bias)
        rec |= _norm_recipes(r, {"layers/attn_norm": p + "input_layernorm", "layers/mlp_norm": p +
                                 "post_attention_layernorm", "final_norm": "gpt_neox.final_layer_norm"})
        embed, head = "gpt_neox.embed_in.weight", "embed_out"
    elif mt == "gptj":
        p = "transformer.h.{i}."
        rec = _attn_recipes(r, lambda i, w: r(f"{p.format(i=i)}attn.{w}_proj.weight", (sizes[w], E)),
                            p + "attn.out_proj.weight", None, None)
        rec |= _linear_recipes(r, {"w_in": p + "mlp.fc_in", "w_out": p + "mlp.fc_out"}, c.mlp_bias)
        rec |= _norm_recipes(r, {"layers/attn_norm": p + "ln_1", "final_norm": "transformer.ln_f"})
        embed, head = "transformer.wte.weight", "lm_head"
    else:  # from_hf_config already rejects other model types
        raise MeshlmError(f"unsupported model_type {mt!r}")
    rec["embed"] = lambda _: r(embed, (V, E))
    rec["lm_head"] = lambda _: r(f"{head}.weight", (V, E)).T
    rec["lm_head_bias"] = lambda _: r(f"{head}.bias", (V,))
    return rec


def load_hf(directory: str | Path, place: Placer, *, progress: bool = True) -> tuple[ModelConfig, dict]:
    """Read config.json and the safetensors weights of a checkpoint directory -> (cfg, params)."""
    d = Path(directory)
    if not d.is_dir():
        raise MeshlmError(f"checkpoint directory {d} does not exist")
    cfg, hf = read_config(d)
    window = hf.get("sliding_window")
    if window and (hf.get("model_type") == "mistral" or hf.get("use_sliding_window")):
        # sliding-window attention equals full attention while the context fits in the window
        cfg = cfg.replace(max_seq_len=min(cfg.max_seq_len, int(window)))
    r = _Reader(SafetensorsCheckpoint(d), cfg)
    params = assemble(cfg, _recipes(r, hf.get("model_type"), hf), place, source=str(d), progress=progress)
    return cfg, params
