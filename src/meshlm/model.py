"""Glossary of the whole project, and the pure-jnp building blocks the sharded model is made of.

Tensor dimensions (upper case, one meaning everywhere: einsum strings, shape comments, specs):
    B  batch (sequences in this pass)          L  query length (tokens in this pass)
    S  cached length (KV cache slots)          E  d_model
    F  d_ff                                    H  query heads
    K  KV heads (MHA: K == H, MQA: K == 1)     D  head dim (the paper's Q)
    V  vocab                                   C  columns of a fused projection (F and heads)
Mesh axes (lower case): x, y, z, the paper's torus axes. A sharded dimension carries its axes as a
subscript, major axis first: `B_x L E_yz`; a mesh axis that appears nowhere means replicated.

Served sizes (meshlm.comm): heads are padded per KV group (H_s, K_s), the KV projection is stored
as kv_slots copies, the vocab is padded to a multiple of the device count (V_s); padding never
changes results.

Everything here works on one device's block (inside shard_map) or on whole arrays alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from meshlm import kernels


def norm_stats(x, rms: bool):
    """Per-token sums over the (local) E of x [..., E] in f32: [..., 1] (RMS: sum x^2) or
    [..., 2] (LayerNorm: sum x, sum x^2). Summing them over the E shards gives the full sums."""
    x32 = x.astype(jnp.float32)
    sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
    return sq if rms else jnp.concatenate([jnp.sum(x32, axis=-1, keepdims=True), sq], axis=-1)


def apply_norm(x, stats, n_e: int, p, rms: bool, eps: float):
    """Normalise x [..., E_local] with full-E statistics `stats` (see norm_stats) over n_e elements;
    p: {"scale": [E_local], "bias"?: [E_local]}."""
    x32 = x.astype(jnp.float32)
    if rms:
        y = x32 * jax.lax.rsqrt(stats[..., :1] / n_e + eps)
    else:
        mu = stats[..., :1] / n_e
        var = stats[..., 1:2] / n_e - mu * mu
        y = (x32 - mu) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


def act(x, name: str):
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


def rope_table(positions, rot_dim: int, theta: float):
    """(cos, sin) [..., R/2] of RoPE's angles at `positions` [...] for the first rot_dim dims."""
    inv = theta ** (-jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim)
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def rotary(x, positions, rot_dim: int, theta: float, style: str):
    """RoPE on the first rot_dim dims of D. x [B, L, N, D], positions [B, L]."""
    R = rot_dim
    cos, sin = (t[:, :, None, :] for t in rope_table(positions, R, theta))  # [B, L, 1, R/2]
    xr = x[..., :R].astype(jnp.float32)
    if style == "half":
        a, b = xr[..., : R // 2], xr[..., R // 2:]
        rot = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rot = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([rot.astype(x.dtype), x[..., R:]], axis=-1)


SCORE_BLOCK_BYTES = 16 << 20  # f32 scores one query block may hold: a few MB keeps them in cache


def attend_causal(q, k, v, lengths):
    """Prefill attention of prompts at positions 0..L-1 (causal, keys < lengths[b]), in query
    blocks: block i attends only to keys [0, end_i), so the masked upper triangle is never computed
    and the [B, Kc, G, block, end] scores stay cache-sized (one [.., L, L] at once is memory-bound on
    CPU: 8 x 512 tokens, 9 heads, 75 MB per layer, ~3x slower). Shapes as `attend`."""
    B, L, Kc, G, _ = q.shape
    rows = SCORE_BLOCK_BYTES // (B * Kc * G * L * 4)
    blk = max(32, 1 << (int(rows).bit_length() - 1)) if rows else 32  # a power of two >= 32
    outs = []
    for s in range(0, L, blk):
        e = min(s + blk, L)
        key = jnp.arange(e)[None, None, :]
        mask = (key <= jnp.arange(s, e)[None, :, None]) & (key < lengths[:, None, None])
        outs.append(attend(q[:, s:e], k[:, :e], v[:, :e], mask))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attend_one(q, k, v, positions):
    """Decode attention: one query per row, q [B, Kc, G, D] against the cache k, v [B, S, Kc, D] at
    positions <= positions[b] -> [B, Kc, G, D]. On CPU with an f32 or bf16 cache: the hand-written kernel
    (meshlm.kernels.decode_attention: reads the cache once, in place; XLA:CPU's dots copy it
    transposed every layer, 2.3 vs ~24 GB/s); elsewhere `attend`."""
    def xla(q, k, v, positions):
        mask = jnp.arange(k.shape[1])[None, None, :] <= positions[:, None, None]
        return attend(q[:, None], k.astype(q.dtype), v.astype(q.dtype), mask)[:, 0]

    if kernels.enabled() and q.dtype == jnp.float32 and k.dtype == v.dtype and k.dtype in kernels.CACHE_DTYPES:
        return jax.lax.platform_dependent(q, k, v, positions, cpu=kernels.decode_attention, default=xla)
    return xla(q, k, v, positions)


def attend(q, k, v, mask):
    """Grouped attention. q [B, L, Kc, G, D], k, v [B, S, Kc, D], mask [B, L, S] -> [B, L, Kc, G, D].
    Softmax in f32; a fully masked row gets a uniform (finite) distribution."""
    D = q.shape[-1]
    s = jnp.einsum("BLKGD,BSKD->BKGLS", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(D)
    s = jnp.where(mask[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("BKGLS,BSKD->BLKGD", p, v.astype(jnp.float32)).astype(q.dtype)
