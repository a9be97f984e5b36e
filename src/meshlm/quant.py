"""int8 weight-only quantization: a weight is a small pytree {"q": int8 [..., R, C], "s": f32 [C]}
with one scale per output channel C (symmetric, absmax / 127). Activations are not quantized (as in
the paper, §3.6): the matmul runs in f32 (CPU) or the activation dtype.

On CPU, `dot_rows` / `dot_t` call a hand-written kernel (meshlm.kernels: reads each int8 weight
once, widens it in registers, f32 FMAs, both cores) when it is available and the number of
activation rows M is at most KERNEL_MAX_M (KERNEL_MAX_M_T for dot_t; packed weights: `packed_kernel_max_m`, by the
kernels' code path); otherwise, and on every other
platform, the XLA path: dequantize one block of ~256 rows at a time inside lax.scan and dot in f32,
so the whole weight is never converted at once. Either way the per-channel scale is applied by the caller to the output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import kernels

ROW_BLOCK = 256
# Rows of x up to which the CPU kernel beats the XLA path (benchmarks/int8_kernel.py "crossover",
# medians of 7 runs, 2026-11-22): x @ q wins through M = 128 (2.7 vs 4.6 ms), ties at 256 (4.9 ms
# each), loses at 512 (10.7 vs 6.9 ms, Eigen's GEMM); x @ q.T wins through 16 and loses at 64.
# Up to the tie the kernel also spares what the XLA path costs after it: it converts each weight
# to a fresh f32 temporary, and over a model (SmolLM2 prefill of 128 tokens: ~0.5 GB of them) that
# churn made the next call on this VM up to 9x slower (benchmarks: decode after a 128-token prefill).
# Packed weights (one device), SmolLM2 FFN pairs x 30 layers (benchmarks/packed_matmul.py, the
# kernel vs XLA on the unpacked weight): f32 107 vs 144 ms at M = 256, 198 vs 207 at 512, 372 vs
# 328 at 1024, so packed f32 keeps this limit. Packed int8 has none: the kernel won at every M
# measured, 85 vs 145 ms at 256, 240 vs 286 at 512, and again on 2026-11-22 (12 layers) 69 vs 90 at
# 512, 128 vs 150 at 1024, 234 vs 281 at 2048; above the limit int8 prefills (1 x 1024 is M = 1024)
# had taken XLA's path and its f32 copy of every weight. Since 2026-12-08 packed f32 has no limit
# either on AVX-512 (6-row tiles, x split in chunks: kernels/matmul.h): Zen 5, 4 FFN pairs, the
# kernel 115-133 vs XLA 125-150 ms at M = 4096, 487-550 vs 669-714 at 16384; the engine's f32
# prefill of 8 x 512 3.56-4.01 -> 2.86-3.11 s, of 16 x 1024 19.5-19.6 -> 13.5-13.6 s.
KERNEL_MAX_M = 256
KERNEL_MAX_M_T = 16
# Those packed crossovers were measured with AVX-512 kernels (Zen 5). Where the kernels run their AVX2
# (or portable) path the XLA GEMM on the unpacked weight wins earlier, for int8 too (Zen 2 host,
# 2026-12-06, benchmarks/packed_matmul.py, 12 FFN pairs): int8 102 vs 79 ms at M = 256, 183 vs 136
# at 512, 372 vs 243 at 1024; f32 95 vs 86 at 256, 189 vs 138 at 512; at 128 within 4% either way.
# With the 6-row tiles and row-range split (2026-12-07): at 128 the kernel 44-45 vs 54-55 ms both
# ways, at 256 int8 92 vs 83 and f32 78 vs 84, at 512 both slower (167 vs 141, 155 vs 140): still 128.
KERNEL_MAX_M_PACKED_AVX2 = 128
XLA_SCAN_MAX_M = 64  # the XLA path dequantizes per row block (in a scan) up to this many rows, else whole


def quantize(w, axis: int = -1):
    """w [..., C] (any float) -> {"q": int8, "s": f32 scales over `axis` kept (others reduced)}."""
    w = np.asarray(w, dtype=np.float32)
    ax = axis % w.ndim
    red = tuple(i for i in range(w.ndim) if i != ax)
    s = np.max(np.abs(w), axis=red) / 127.0
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    shape = [1] * w.ndim
    shape[ax] = -1
    q = np.clip(np.rint(w / s.reshape(shape)), -127, 127).astype(np.int8)
    return {"q": q, "s": s}


def dequantize(t, axis: int = -1):
    shape = [1] * t["q"].ndim
    shape[axis % t["q"].ndim] = -1
    return t["q"].astype(jnp.float32) * jnp.reshape(t["s"], shape)


def is_quantized(w) -> bool:
    """An int8 weight: {"q": [R, C], "s": [C]}, or packed {"p": [C/64, R, 64], "s"} (pack_panels)."""
    return isinstance(w, dict) and "s" in w


def is_packed(w) -> bool:
    """A weight packed panel-major (one CPU device): {"p": int8, "s"} or {"p": f32}."""
    return isinstance(w, dict) and "p" in w


def array_of(w):
    """The stored array of a weight in any of its forms (plain, int8, packed)."""
    return w if not isinstance(w, dict) else w["p"] if "p" in w else w["q"]


def row_block(R: int) -> int | None:
    """Rows per dequantisation block: ROW_BLOCK, or the largest divisor of R in [ROW_BLOCK/2,
    ROW_BLOCK] (e.g. 144 for a 288-row shard); None when R is small or has no such divisor."""
    if R <= ROW_BLOCK:
        return None
    return _divisor(R, ROW_BLOCK // 2, ROW_BLOCK)


def packed_kernel_max_m(int8: bool) -> float:
    """The most activation rows a packed weight (int8 or f32) goes to the CPU kernel with, by the
    code path the kernels were built with: AVX-512 at any M (int8 and f32); AVX2 and the portable
    loops up to KERNEL_MAX_M_PACKED_AVX2."""
    if kernels.isa() == "avx512":
        return float("inf")
    return KERNEL_MAX_M_PACKED_AVX2


def use_kernel(M: int, transposed: bool = False, packed: str | None = None) -> bool:
    """Whether a dot with M activation rows goes to the CPU kernel (on CPU): int8 x @ q, or int8
    x @ q.T when transposed, or x @ a packed weight (`packed`: "int8" or "f32")."""
    if not kernels.enabled():
        return False
    if packed:
        return M <= packed_kernel_max_m(packed == "int8")
    return M <= (KERNEL_MAX_M_T if transposed else KERNEL_MAX_M)


def dot_rows(x, w, dtype, scale=None):
    """x [M, R] @ w [R, C] with w int8 (unscaled) or float, times the per-column `scale` [C] when
    given; result in `dtype` (f32 accumulate). A w of rank 3 is packed panel-major ([C/64, R, 64],
    `pack_panels`; int8 or f32).

    int8 and packed: the CPU kernel for small M on CPU (packed: up to `packed_kernel_max_m` rows, the
    scale applied inside it), else the XLA path (`xla_dot_rows`)."""
    if w.ndim == 3:
        f32 = w.dtype != jnp.int8

        def xla(x, w, *s):
            w = unpack_panels(w)
            y = jnp.dot(x.astype(jnp.float32), w) if f32 else xla_dot_rows(x, w)
            return y * s[0] if s else y
        args = (x, w) if scale is None else (x, w, scale)
        if x.ndim == 2 and use_kernel(x.shape[0], packed="f32" if f32 else "int8"):
            return jax.lax.platform_dependent(*args, cpu=kernels.packed_matmul, default=xla).astype(dtype)
        return xla(*args).astype(dtype)
    if scale is not None:
        return (dot_rows(x, w, jnp.float32) * scale).astype(dtype)
    if w.dtype != jnp.int8:
        return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    if x.ndim == 2 and use_kernel(x.shape[0]):
        return jax.lax.platform_dependent(x, w, cpu=kernels.int8_matmul, default=xla_dot_rows).astype(dtype)
    return xla_dot_rows(x, w).astype(dtype)


def xla_dot_rows(x, w):
    """f32 x [M, R] @ w [R, C] (int8) in plain XLA. Small M (memory-bound): per-block dequantization
    in a scan when R splits into blocks, so the whole weight is never converted at once. Large M
    (prefill): one dequantization per weight, amortized over the M rows; the block scans there held
    ~10x the f32 model in temporaries (SmolLM2 8 x 512 prefill: 2.6 GB vs 0.24 GB) and ran ~1.8x slower."""
    R = w.shape[0]
    blk = row_block(R)
    if blk is None or x.shape[0] > XLA_SCAN_MAX_M:
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    nb = R // blk
    xb = x.astype(jnp.float32).reshape(x.shape[0], nb, blk).transpose(1, 0, 2)
    wb = w.reshape(nb, blk, w.shape[1])

    def step(acc, xw):
        xi, wi = xw
        return acc + jnp.dot(xi, wi.astype(jnp.float32)), None

    acc, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], w.shape[1]), jnp.float32), (xb, wb))
    return acc


def packable(q) -> bool:
    """Whether a weight [R, C] can be packed: C a whole number of panels."""
    return q.ndim == 2 and q.shape[1] % kernels.PANEL == 0


def packs(weights: str, n_devices: int) -> bool:
    """Whether weights of this format are stored packed (pack_panels) for the CPU kernels: int8 or
    f32 on one CPU device, where no layout gathers or slices them."""
    return weights in ("int8", "f32") and n_devices == 1 and kernels.enabled()


def pack_panels(q):
    """[R, C] -> [C/64, R, 64] (numpy, any dtype): each panel of 64 columns one contiguous block,
    which the CPU kernels stream in order (the engine stores a single device's weights this way)."""
    R, C = q.shape
    return np.ascontiguousarray(np.asarray(q).reshape(R, C // kernels.PANEL, kernels.PANEL).transpose(1, 0, 2))


def unpack_panels(p):
    """The inverse of pack_panels (jnp, for the XLA path): [C/64, R, 64] -> [R, C]."""
    return p.transpose(1, 0, 2).reshape(p.shape[1], -1)


def _divisor(n: int, lo: int, hi: int) -> int | None:
    return next((b for b in range(hi, lo - 1, -1) if n % b == 0), None)


COL_CHUNK = 1024  # rows of a transposed int8 weight dequantized at once: 1024 x E f32 stays in cache


def dot_t(x, wt, dtype):
    """x [M, R] @ wt.T with wt [C, R] (the tied embedding [V, E] as the output projection).

    int8: the CPU kernel for small M on CPU, else `xla_dot_t`."""
    if wt.dtype != jnp.int8:  # contract E of both as stored ('ME,CE->MC'): no transposed copy of the table
        return jax.lax.dot_general(x.astype(dtype), wt.astype(dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(dtype)
    if x.ndim == 2 and use_kernel(x.shape[0], transposed=True):
        return jax.lax.platform_dependent(x, wt, cpu=kernels.int8_matmul_t, default=xla_dot_t).astype(dtype)
    return xla_dot_t(x, wt).astype(dtype)


def xla_dot_t(x, wt):
    """f32 x [M, R] @ wt.T (wt int8 [C, R]) in plain XLA: a scan over chunks of ~COL_CHUNK rows of
    wt, each dequantized and multiplied while it is still in cache (dequantizing all of a [V, E]
    table at once costs ~20x the int8 read)."""
    C, R = wt.shape
    cs = _divisor(C, COL_CHUNK // 4, COL_CHUNK) if C > COL_CHUNK else None
    xf = x.astype(jnp.float32)
    if cs is None:
        return jnp.dot(xf, wt.astype(jnp.float32).T)

    def step(_, wc):
        return None, jnp.dot(xf, wc.astype(jnp.float32).T)  # [M, cs]

    _, out = jax.lax.scan(step, None, wt.reshape(C // cs, cs, R))
    return out.transpose(1, 0, 2).reshape(x.shape[0], C)


def _fake(w, axis: int):
    """w with every slice along `axis` quantized and dequantized (numpy, f32)."""
    t = quantize(w, axis=axis)
    shape = [1] * t["q"].ndim
    shape[axis % t["q"].ndim] = -1
    return t["q"].astype(np.float32) * t["s"].reshape(shape)


def int8_as_f32(params, cfg):
    """The canonical f32 params that meshlm's int8 model computes with (same scale groups as
    meshlm.sharded_params: per output column of each input matrix and per layer; output matrices
    share one scale per E column, fused with W_O in the parallel block; embedding per row,
    lm_head per column). Lets tests hold the int8 path to 1e-4 against the reference."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    lp = dict(p["layers"])
    Y = cfg.n_layers
    for name in ("w_gate", "w_up", "w_in", "wq", "wk", "wv"):
        if name in lp:
            w = lp[name]
            flat = w.reshape(Y, w.shape[1], -1)
            lp[name] = np.stack([_fake(flat[i], axis=-1) for i in range(Y)]).reshape(w.shape)
    wo = lp["wo"].reshape(Y, -1, cfg.d_model)
    groups = [[wo, lp["w_out"]]] if cfg.block == "parallel" else [[wo], [lp["w_out"]]]
    out = {}
    for g in groups:
        joint = np.concatenate(g, axis=1)
        fq = np.stack([_fake(joint[i], axis=-1) for i in range(Y)])
        o = 0
        for a in g:
            out[id(a)] = fq[:, o:o + a.shape[1]]
            o += a.shape[1]
    lp["wo"] = out[id(wo)].reshape(lp["wo"].shape)
    lp["w_out"] = out[id(lp["w_out"])]
    p["layers"] = lp
    p["embed"] = _fake(p["embed"], axis=0)
    if "lm_head" in p:
        p["lm_head"] = _fake(p["lm_head"], axis=1)
    return p
