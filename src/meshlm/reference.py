"""The naive, unsharded reference model: the oracle every layout and every loader is checked against.

Plain `jax.numpy`, no shard_map, no fusion, written to be obviously right rather than fast. Its
norm, RoPE and attention are deliberately written apart from the sharded model's (`meshlm.model`):
an oracle that shares code with what it checks cannot catch that code's bugs (the reference
itself is checked against Hugging Face `transformers`).
Params, cache and semantics are the project's contract (see `meshlm.model` for the glossary):

    params["layers"][name] is stacked over layers (leading axis); per layer:
      wq [E, H, D]  wk, wv [E, K, D]  wo [H, D, E]
      w_gate, w_up [E, F] (gated) | w_in [E, F] (plain)   w_out [F, E]
    cache = {"k": [layers, B, S, K, D], "v": same}

Prompts are right-padded: sequence b holds tokens[b, :lengths[b]] at positions 0..lengths[b]-1.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from meshlm.config import ModelConfig

# ---- building blocks -----------------------------------------------------------------------------


def norm(x, p, cfg: ModelConfig):
    """RMSNorm or LayerNorm over E, computed in f32."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    else:
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean((x32 - mu) ** 2, axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + cfg.norm_eps)
    y = y * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


def activation(x, name: str):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)


def rope(x, positions, cfg: ModelConfig):
    """Rotary embedding on the first cfg.rot_dim dims of D. x [B, L, N, D], positions [B, L]."""
    R = cfg.rot_dim
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, R, 2, dtype=jnp.float32) / R)  # [R/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, R/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xr, xp = x[..., :R].astype(jnp.float32), x[..., R:]
    if cfg.rope_style == "half":
        x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:  # interleaved pairs (2i, 2i+1), GPT-J
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), xp], axis=-1)


def mlp(x, lp, cfg: ModelConfig):
    """x [B, L, E] -> [B, L, E]."""
    if cfg.gated_mlp:
        g = jnp.einsum("BLE,EF->BLF", x, lp["w_gate"])
        u = jnp.einsum("BLE,EF->BLF", x, lp["w_up"])
        if "b_gate" in lp:
            g, u = g + lp["b_gate"], u + lp["b_up"]
        h = activation(g, cfg.activation) * u
    else:
        h = jnp.einsum("BLE,EF->BLF", x, lp["w_in"])
        if "b_in" in lp:
            h = h + lp["b_in"]
        h = activation(h, cfg.activation)
    out = jnp.einsum("BLF,FE->BLE", h, lp["w_out"])
    return out + lp["b_out"] if "b_out" in lp else out


def attention(x, lp, cfg: ModelConfig, k_cache, v_cache, positions, mask):
    """Attention of x [B, L, E] at `positions` [B, L] against the cache after writing this pass.

    k_cache, v_cache [B, S, K, D]; mask [B, L, S] True where a query may see a key.
    Returns (out [B, L, E], k_cache, v_cache)."""
    q = jnp.einsum("BLE,EHD->BLHD", x, lp["wq"])
    k = jnp.einsum("BLE,EKD->BLKD", x, lp["wk"])
    v = jnp.einsum("BLE,EKD->BLKD", x, lp["wv"])
    if "bq" in lp:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k = rope(q, positions, cfg), rope(k, positions, cfg)
    k_cache, v_cache = _write(k_cache, k, positions), _write(v_cache, v, positions)
    B, L, H, D = q.shape
    K = cfg.n_kv_heads
    qg = q.reshape(B, L, K, H // K, D)  # query head h = k * (H/K) + g uses KV head k
    s = jnp.einsum("BLKGD,BSKD->BKGLS", qg.astype(jnp.float32), k_cache.astype(jnp.float32)) / math.sqrt(D)
    s = jnp.where(mask[:, None, None, :, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BKGLS,BSKD->BLKGD", p, v_cache.astype(jnp.float32)).reshape(B, L, H, D).astype(x.dtype)
    out = jnp.einsum("BLHD,HDE->BLE", o, lp["wo"])
    return (out + lp["bo"] if "bo" in lp else out), k_cache, v_cache


def _write(cache, new, positions):
    """cache [B, S, K, D] <- new [B, L, K, D] at positions [B, L] (positions >= S are dropped)."""
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, positions].set(new.astype(cache.dtype), mode="drop")


def block(x, lp, cfg: ModelConfig, k_cache, v_cache, positions, mask):
    """One transformer layer; returns (y, k_cache, v_cache)."""
    h = norm(x, lp["attn_norm"], cfg)
    a, k_cache, v_cache = attention(h, lp, cfg, k_cache, v_cache, positions, mask)
    if cfg.block == "serial":
        x = x + a
        return x + mlp(norm(x, lp["mlp_norm"], cfg), lp, cfg), k_cache, v_cache
    h2 = norm(x, lp["mlp_norm"], cfg) if cfg.parallel_norms == 2 else h
    return x + a + mlp(h2, lp, cfg), k_cache, v_cache


def logits(x, params, cfg: ModelConfig):
    h = norm(x, params["final_norm"], cfg)
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    out = jnp.einsum("BLE,EV->BLV", h, w).astype(jnp.float32)
    return out + params["lm_head_bias"] if "lm_head_bias" in params else out


def _layer(lps, i):
    return jax.tree.map(lambda a: a[i], lps)


def _run(params, cfg, tokens, positions, mask, cache):
    x = params["embed"][tokens]
    ks, vs = [], []
    for i in range(cfg.n_layers):
        x, k, v = block(x, _layer(params["layers"], i), cfg, cache["k"][i], cache["v"][i], positions, mask)
        ks.append(k)
        vs.append(v)
    return logits(x, params, cfg), {"k": jnp.stack(ks), "v": jnp.stack(vs)}


# ---- the public functions (see the module docstring) ---------------------------------------------


_jit = partial(jax.jit, static_argnums=1)  # cfg is static (hashable); the rest are arrays


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32):
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.d_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@_jit
def prefill(params, cfg: ModelConfig, tokens, lengths, cache):
    """tokens [B, L] right-padded, lengths [B] -> (logits [B, L, V], cache with positions < lengths)."""
    B, L = tokens.shape
    S = cache["k"].shape[2]
    pos = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L))
    valid = pos < lengths[:, None]
    positions = jnp.where(valid, pos, S)  # pads write nowhere (dropped)
    key = jnp.arange(S)[None, None, :]
    mask = (key <= pos[:, :, None]) & (key < lengths[:, None, None])
    return _run(params, cfg, tokens, positions, mask, cache)


@_jit
def decode(params, cfg: ModelConfig, cache, tokens, positions):
    """tokens [B], positions [B] -> (logits [B, V], cache)."""
    S = cache["k"].shape[2]
    mask = jnp.arange(S)[None, None, :] <= positions[:, None, None]
    out, cache = _run(params, cfg, tokens[:, None], positions[:, None], mask, cache)
    return out[:, 0], cache


@_jit
def forward(params, cfg: ModelConfig, tokens):
    """Full causal forward without a persistent cache: tokens [B, L] -> logits [B, L, V]."""
    B, L = tokens.shape
    dtype = params["embed"].dtype
    out, _ = prefill(params, cfg, tokens, jnp.full((B,), L, jnp.int32), init_cache(cfg, B, L, dtype))
    return out


def init_params(cfg: ModelConfig, key, dtype=jnp.float32):
    """Random parameters scaled so activations stay O(1) (for tests; real weights come from loaders)."""
    E, F, H, K, D, V, Y = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.vocab, cfg.n_layers
    shapes = {"wq": (Y, E, H, D), "wk": (Y, E, K, D), "wv": (Y, E, K, D), "wo": (Y, H, D, E), "w_out": (Y, F, E)}
    fan_in = {"wq": E, "wk": E, "wv": E, "wo": H * D, "w_out": F}
    mlp_in = ("w_gate", "w_up") if cfg.gated_mlp else ("w_in",)
    for n in mlp_in:
        shapes[n], fan_in[n] = (Y, E, F), E
    bias_shapes = {}
    if cfg.qkv_bias:
        bias_shapes.update(bq=(Y, H, D), bk=(Y, K, D), bv=(Y, K, D))
    if cfg.out_bias:
        bias_shapes["bo"] = (Y, E)
    if cfg.mlp_bias:
        bias_shapes.update({"b_" + n[2:]: (Y, F) for n in mlp_in}, b_out=(Y, E))
    keys = iter(jax.random.split(key, 64))

    def normal(shape, scale):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dtype)

    def norm_p(shape):
        p = {"scale": (1.0 + normal(shape, 0.1)).astype(dtype)}
        if cfg.norm == "layernorm" and cfg.norm_bias:
            p["bias"] = normal(shape, 0.1)
        return p

    layers = {n: normal(s, 1.0 / math.sqrt(fan_in[n])) for n, s in shapes.items()}
    layers.update({n: normal(s, 0.1) for n, s in bias_shapes.items()})
    layers["attn_norm"] = norm_p((Y, E))
    if cfg.block == "serial" or cfg.parallel_norms == 2:
        layers["mlp_norm"] = norm_p((Y, E))
    params = {"embed": normal((V, E), 1.0), "final_norm": norm_p((E,)), "layers": layers}
    if not cfg.tie_embeddings:
        params["lm_head"] = normal((E, V), 1.0 / math.sqrt(E))
    if cfg.lm_head_bias:
        params["lm_head_bias"] = normal((V,), 0.1)
    return params
