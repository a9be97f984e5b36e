"""Model configuration: one frozen dataclass for every decoder-only architecture meshlm serves.

Letters follow the glossary in `meshlm.model`: E d_model, F d_ff, H query heads, K KV heads,
D head dim, V vocab. MHA is K == H, MQA is K == 1, GQA is anything between.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlm.errors import MeshlmError

BLOCKS = ("parallel", "serial")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NORMS = ("rmsnorm", "layernorm")
ROPE_STYLES = ("half", "interleaved")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layers: int
    d_model: int  # E
    d_ff: int  # F
    n_heads: int  # H (as served: may be padded, see mfu_n_heads)
    n_kv_heads: int  # K
    d_head: int  # D (the paper's Q)
    vocab: int  # V
    block: str = "serial"  # "parallel": y = x + attn(norm(x)) + mlp(norm'(x)); "serial": Llama
    parallel_norms: int = 1  # parallel block: 1 shared norm (PaLM, GPT-J, Falcon-7B) or 2 (NeoX, Falcon-40B)
    gated_mlp: bool = True  # SwiGLU/GeGLU (3 matrices) vs plain 2-matrix MLP
    activation: str = "silu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm with a bias (only meaningful for layernorm)
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None: full d_head; else rotate only the first rotary_dim dims
    rope_style: str = "half"  # "half": rotate_half (Llama, NeoX); "interleaved": pairs (GPT-J)
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = True
    lm_head_bias: bool = False  # GPT-J
    max_seq_len: int = 2048
    mfu_n_heads: int | None = None  # heads counted for MFU when served padded (PaLM 540B: 48 of 64)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        checks = [
            (self.block in BLOCKS, f"block must be one of {BLOCKS}, got {self.block!r}"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.rope_style in ROPE_STYLES, f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}"),
            (self.parallel_norms in (1, 2), "parallel_norms must be 1 or 2"),
            (min(self.n_layers, self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.d_head, self.vocab) > 0,
             "all dimensions must be positive"),
            (self.n_heads % self.n_kv_heads == 0, f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"),
            (self.rotary_dim is None or (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0),
             "rotary_dim must be even and within d_head"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MeshlmError(f"model {self.name!r}: {msg}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def group(self) -> int:
        """Query heads per KV head (1 for MHA, H for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "mha"
        return "mqa" if self.n_kv_heads == 1 else "gqa"

    @property
    def rot_dim(self) -> int:
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    def attn_params_per_layer(self, n_heads: int | None = None) -> int:
        h = self.n_heads if n_heads is None else n_heads
        E, D, K = self.d_model, self.d_head, self.n_kv_heads
        n = 2 * E * h * D + 2 * E * K * D
        if self.qkv_bias:
            n += (h + 2 * K) * D
        if self.out_bias:
            n += E
        return n

    def mlp_params_per_layer(self) -> int:
        E, F = self.d_model, self.d_ff
        n = (3 if self.gated_mlp else 2) * E * F
        if self.mlp_bias:
            n += (2 if self.gated_mlp else 1) * F + E
        return n

    @property
    def norm_params(self) -> int:
        """Parameters of one norm (scale, plus bias for LayerNorm with bias)."""
        return self.d_model * (2 if (self.norm == "layernorm" and self.norm_bias) else 1)

    @property
    def norms_per_layer(self) -> int:
        return 2 if self.block == "serial" else self.parallel_norms

    def n_params(self, n_heads: int | None = None) -> int:
        """Parameter count (as served unless n_heads overrides the head count)."""
        E, V = self.d_model, self.vocab
        per_layer = self.attn_params_per_layer(n_heads) + self.mlp_params_per_layer() + self.norms_per_layer * self.norm_params
        n = self.n_layers * per_layer + V * E + self.norm_params  # + final norm
        if not self.tie_embeddings:
            n += E * V + (V if self.lm_head_bias else 0)
        return n

    @property
    def n_params_mfu(self) -> int:
        """The N of MFU = 2 N tokens / (t chips peak): unpadded, as the paper reports it."""
        return self.n_params(self.mfu_n_heads)

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        """K and V for one token over all layers: 2 * n_layers * K * D * bytes."""
        return 2 * self.n_layers * self.n_kv_heads * self.d_head * bytes_per_value

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


# ---- presets -------------------------------------------------------------------------------------
def _palm(name: str, L: int, E: int, H: int, mfu_H: int | None = None) -> ModelConfig:
    # [PaLM] Table 1: F = 4E, multiquery (K = 1), d_head 256, SwiGLU, parallel block, no biases,
    # shared embeddings, vocab 256,000 (reproduces 8.63B / 62.50B / 540.35B exactly).
    return ModelConfig(name=name, n_layers=L, d_model=E, d_ff=4 * E, n_heads=H, n_kv_heads=1, d_head=256,
                       vocab=256_000, block="parallel", gated_mlp=True, activation="silu", norm="layernorm",
                       norm_eps=1e-6, tie_embeddings=True, mfu_n_heads=mfu_H)


def _llama3(name: str, L: int, E: int, F: int, H: int) -> ModelConfig:
    return ModelConfig(name=name, n_layers=L, d_model=E, d_ff=F, n_heads=H, n_kv_heads=8, d_head=128,
                       vocab=128_256, rope_theta=500_000.0, tie_embeddings=False, max_seq_len=8192)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _palm("palm-8b", 32, 4096, 16),
        _palm("palm-62b", 64, 8192, 32),
        # Served with heads padded 48 -> 64 ([P] §4: +18B parameters); MFU counts the 540B unpadded.
        _palm("palm-540b", 118, 18432, 64, mfu_H=48),
        # [P] Table D.1; GPT-style: serial block, 2-matrix GELU MLP, LayerNorm with bias, biases.
        ModelConfig(name="mt-nlg-530b", n_layers=105, d_model=20480, d_ff=81920, n_heads=128, n_kv_heads=128,
                    d_head=160, vocab=51200, block="serial", gated_mlp=False, activation="gelu",
                    norm="layernorm", norm_bias=True, qkv_bias=True, out_bias=True, mlp_bias=True),
        _llama3("llama-3-8b", 32, 4096, 14336, 32),
        _llama3("llama-3-70b", 80, 8192, 28672, 64),
        _llama3("llama-3-405b", 126, 16384, 53248, 128),
        ModelConfig(name="falcon-7b", n_layers=32, d_model=4544, d_ff=18176, n_heads=71, n_kv_heads=1, d_head=64,
                    vocab=65024, block="parallel", parallel_norms=1, gated_mlp=False, activation="gelu",
                    norm="layernorm", norm_bias=True, tie_embeddings=True),
        ModelConfig(name="falcon-40b", n_layers=60, d_model=8192, d_ff=32768, n_heads=128, n_kv_heads=8, d_head=64,
                    vocab=65024, block="parallel", parallel_norms=2, gated_mlp=False, activation="gelu",
                    norm="layernorm", norm_bias=True, tie_embeddings=True),
        ModelConfig(name="smollm2-135m", n_layers=30, d_model=576, d_ff=1536, n_heads=9, n_kv_heads=3, d_head=64,
                    vocab=49152, rope_theta=100_000.0, tie_embeddings=True, max_seq_len=8192),
        # Tiny models for tests and `meshlm layouts`: dimensions divide an 8-device mesh in every way.
        ModelConfig(name="tiny-palm", n_layers=2, d_model=64, d_ff=256, n_heads=8, n_kv_heads=1, d_head=16,
                    vocab=256, block="parallel", norm="layernorm", max_seq_len=256),
        ModelConfig(name="tiny-llama", n_layers=2, d_model=64, d_ff=128, n_heads=8, n_kv_heads=2, d_head=16,
                    vocab=256, block="serial", max_seq_len=256),
    ]
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise MeshlmError(f"unknown model {name!r}; known: {', '.join(PRESETS)} or a path to a config.json") from None


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset name, a Hugging Face config.json, or a checkpoint directory that holds one."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        return preset(name_or_path)  # raises the 'unknown model' error
    try:
        hf = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MeshlmError(f"cannot read model config {p}: {e}") from None
    if not isinstance(hf, dict):
        raise MeshlmError(f"model config {p} is not a JSON object")
    return from_hf_config(hf, name=p.parent.name or p.stem)


def _act(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if name not in table:
        raise MeshlmError(f"unsupported activation {name!r}")
    return table[name]


def from_hf_config(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face config.json (llama, mistral, qwen2, falcon, gpt_neox, gptj) to ModelConfig."""
    mt = hf.get("model_type")
    rp = hf.get("rope_parameters")  # transformers >= 5 nests RoPE settings here
    if isinstance(rp, dict):
        hf = {**hf, **{k: rp[k] for k in ("rope_theta", "partial_rotary_factor") if k in rp}}
        if rp.get("rope_type", "default") != "default":
            hf["rope_scaling"] = rp
    try:
        if mt in ("llama", "mistral", "qwen2"):
            E, H = hf["hidden_size"], hf["num_attention_heads"]
            rs = hf.get("rope_scaling")
            if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
                raise MeshlmError(f"rope_scaling {rs.get('rope_type', rs.get('type'))!r} is not supported yet")
            return ModelConfig(
                name=name, n_layers=hf["num_hidden_layers"], d_model=E, d_ff=hf["intermediate_size"], n_heads=H,
                n_kv_heads=hf.get("num_key_value_heads") or H, d_head=hf.get("head_dim") or E // H,
                vocab=hf["vocab_size"], block="serial", gated_mlp=True, activation=_act(hf.get("hidden_act", "silu")),
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 10000.0)),
                qkv_bias=bool(hf.get("attention_bias", False)) or mt == "qwen2",
                out_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_seq_len=hf.get("max_position_embeddings", 2048), extra={"model_type": mt})
        if mt == "falcon":
            E, H = hf["hidden_size"], hf["num_attention_heads"]
            if hf.get("alibi"):
                raise MeshlmError("Falcon with ALiBi positions is not supported")
            new = bool(hf.get("new_decoder_architecture", False))
            K = hf.get("num_kv_heads") if new else (1 if hf.get("multi_query", True) else H)
            return ModelConfig(
                name=name, n_layers=hf["num_hidden_layers"], d_model=E, d_ff=hf.get("ffn_hidden_size") or 4 * E,
                n_heads=H, n_kv_heads=K or H, d_head=E // H, vocab=hf["vocab_size"],
                block="parallel" if (new or hf.get("parallel_attn", True)) else "serial",
                parallel_norms=(hf.get("num_ln_in_parallel_attn") or 2) if new else 1,
                gated_mlp=False, activation=_act(hf.get("activation", "gelu")), norm="layernorm", norm_bias=True,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_theta=float(hf.get("rope_theta", 10000.0)),
                qkv_bias=bool(hf.get("bias", False)), out_bias=bool(hf.get("bias", False)),
                mlp_bias=bool(hf.get("bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                max_seq_len=hf.get("max_position_embeddings", 2048), extra={"model_type": mt})
        if mt == "gpt_neox":
            E, H = hf["hidden_size"], hf["num_attention_heads"]
            D = E // H
            return ModelConfig(
                name=name, n_layers=hf["num_hidden_layers"], d_model=E, d_ff=hf["intermediate_size"], n_heads=H,
                n_kv_heads=H, d_head=D, vocab=hf["vocab_size"],
                block="parallel" if hf.get("use_parallel_residual", True) else "serial", parallel_norms=2,
                gated_mlp=False, activation=_act(hf.get("hidden_act", "gelu")), norm="layernorm", norm_bias=True,
                norm_eps=hf.get("layer_norm_eps", 1e-5),
                rope_theta=float(hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0))),
                rotary_dim=int(D * hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0))),
                qkv_bias=bool(hf.get("attention_bias", True)), out_bias=bool(hf.get("attention_bias", True)),
                mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_seq_len=hf.get("max_position_embeddings", 2048), extra={"model_type": mt})
        if mt == "gptj":
            E, H = hf["n_embd"], hf["n_head"]
            return ModelConfig(
                name=name, n_layers=hf["n_layer"], d_model=E, d_ff=hf.get("n_inner") or 4 * E, n_heads=H,
                n_kv_heads=H, d_head=E // H, vocab=hf["vocab_size"], block="parallel", parallel_norms=1,
                gated_mlp=False, activation=_act(hf.get("activation_function", "gelu_new")), norm="layernorm",
                norm_bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), rotary_dim=hf.get("rotary_dim"),
                rope_style="interleaved", mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                lm_head_bias=True, max_seq_len=hf.get("n_positions", 2048), extra={"model_type": mt})
    except KeyError as e:
        raise MeshlmError(f"config.json for model_type {mt!r} lacks the field {e.args[0]!r}") from None
    raise MeshlmError(f"unsupported model_type {mt!r}; supported: llama, mistral, qwen2, falcon, gpt_neox, gptj")
