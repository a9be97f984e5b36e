"""Hand-written CPU kernels, called from jitted JAX code as XLA FFI custom calls.

- `int8_matmul(x, q)` = x @ q and `int8_matmul_t(x, q)` = x @ q.T for f32 x [M, R] and an int8
  weight (unscaled): they read each int8 weight once and widen it in registers (int8_matmul.cc),
  which XLA:CPU's own int8 paths do not.
  `packed_matmul(x, p)` = x @ q for q int8 or f32 packed panel-major (meshlm.quant.pack_panels):
  each panel of 64 columns one contiguous stream, ~35% faster to stream than the row-major q.
- `decode_attention(q, k, v, positions)`: one query position per sequence against the KV cache as
  stored, each cached row read once (decode_attention.cc); XLA:CPU's dots copy the cache transposed.
- `argmax(x)`: greedy sampling's first index of each row's max, rows cut into chunks over the
  threads (argmax.cc).
- `decoder_layer(...)`: a whole Llama-style decode layer with packed weights on one device
  (decoder_layer.cc): one call instead of ~15 XLA fusions and 5 kernel calls per layer.

The library is compiled on first use with the system g++
(cached under $MESHLM_HOME/kernels) and registered for platform "cpu" only; call these on CPU
(e.g. from a `jax.lax.platform_dependent` branch). `available()` says whether they can be used;
when not (MESHLM_KERNELS=0, no compiler, a failed build), `reason()` says why, logged once.

The sources hold three code paths, picked at compile time from the CPU (-march=native): AVX-512,
AVX2 + FMA, and portable loops; `isa()` says which one was built. MESHLM_KERNEL_ISA=avx2 or
=portable builds a lower one on a CPU that has more (what tests/test_kernels_isa.py runs the kernel
tests under, so that every path is checked on any x86 host)."""

from __future__ import annotations

import ctypes
import math
import logging
import os
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from meshlm.kernels.build import BuildError, build
from meshlm.paths import switched_off

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(f) for f in ("ffi_common.h", "matmul.h", "attention.h", "int8_matmul.cc",
                                                   "decode_attention.cc", "decoder_layer.cc", "argmax.cc")]
_TARGETS = ("meshlm_int8_matmul", "meshlm_int8_matmul_t", "meshlm_int8_matmul_p", "meshlm_f32_matmul_p",
            "meshlm_decode_attention", "meshlm_decoder_layer", "meshlm_argmax")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "lib": ctypes.CDLL (kept alive: XLA holds its pointers)


# MESHLM_KERNEL_ISA: the flags that keep g++ below the CPU's own instruction set
ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}


def _load() -> tuple[bool, str]:
    if switched_off("MESHLM_KERNELS"):
        return False, "CPU kernels disabled by MESHLM_KERNELS=0; using the XLA paths"
    isa = os.environ.get("MESHLM_KERNEL_ISA", "native").strip().lower()
    if isa not in ISA_FLAGS:
        return False, f"MESHLM_KERNEL_ISA={isa!r} is not one of {', '.join(ISA_FLAGS)}; using the XLA paths"
    try:
        lib_path = build(_SOURCES, "meshlm_kernels", jax.ffi.include_dir(), f"jax {jax.__version__}",
                         ISA_FLAGS[isa])
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        for name in _TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (BuildError, OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
        return False, f"CPU kernels unavailable ({e}); using the XLA paths"
    _state["lib"] = lib
    lib.meshlm_kernel_isa.restype = ctypes.c_char_p
    _state["isa"] = lib.meshlm_kernel_isa().decode()
    return True, f"CPU kernels ({_state['isa']}) loaded from {lib_path}"


def _ensure() -> None:
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["reason"] = _load()
            (log.info if _state["ok"] else log.warning)(_state["reason"])


def available() -> bool:
    """True when the kernels are built and registered (builds them on the first call)."""
    _ensure()
    return _state["ok"]


def enabled() -> bool:
    """True when jitted code lowered now runs on CPU and the kernels are built: on accelerator
    hosts nothing is compiled and callers lower their XLA path alone."""
    return jax.default_backend() == "cpu" and available()


def isa() -> str | None:
    """The code path the kernels were compiled with ("avx512", "avx2" or "portable"); None when they
    are unavailable."""
    return _state.get("isa") if available() else None


def reason() -> str:
    """Why the kernels are (un)available, in one line."""
    _ensure()
    return _state["reason"]


PANEL = 64  # columns per panel of a packed weight (matmul.h: PW)


def _matmul(target: str, x, q, R: int, C: int, ok: bool, want: str, *extra):
    """f32 [M, C] from the matmul FFI target on x [M, R], q (and `extra` inputs), after checking
    the shapes (`ok`; `want` says what is expected)."""
    if x.ndim != 2 or not ok or x.shape[1] != R:
        raise ValueError(f"{target} wants {want}; got x {x.shape}, q {q.shape} {q.dtype}")
    return _ffi(f"meshlm_{target}", [(x.shape[0], C)], x.astype(jnp.float32), q, *extra)[0]


def _ffi(target: str, shapes, *args, aliases=None, dtype=jnp.float32, **attrs):
    """Results of `shapes` (tuples, of `dtype`, or ShapeDtypeStructs) from the FFI target on `args` (attributes `attrs`;
    `aliases`: input index -> result index updated in place), marked varying over every shard_map
    axis an input varies over."""
    if not available():
        raise RuntimeError(reason())
    structs = [s if isinstance(s, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    outs = jax.ffi.ffi_call(target, structs, vmap_method="sequential",
                            input_output_aliases=aliases)(*args, **attrs)
    axes = _varying_axes(*args)
    return [jax.lax.pcast(o, axes, to="varying") for o in outs] if axes else list(outs)


def _varying_axes(*arrays) -> tuple:
    """Mesh axes any input varies over inside shard_map: an FFI result carries none, so it is marked
    varying over them (a no-op at run time) to type-check against the XLA branch."""
    axes = set()
    for a in arrays:
        t = jax.typeof(a)
        mat = getattr(t, "manual_axis_type", None)  # jax 0.10; older releases call it `vma`
        axes |= set(getattr(mat, "varying", None) or getattr(t, "vma", None) or ())
    return tuple(sorted(axes))


def int8_matmul(x, q):
    """f32 [M, C] = x [M, R] @ q [R, C] (q int8, unscaled). CPU only."""
    ok = q.ndim == 2 and q.dtype == jnp.int8
    return _matmul("int8_matmul", x, q, q.shape[0], q.shape[-1], ok, "x [M, R], q int8 [R, C]")


def int8_matmul_t(x, q):
    """f32 [M, C] = x [M, R] @ q.T for q int8 [C, R] (unscaled). CPU only."""
    ok = q.ndim == 2 and q.dtype == jnp.int8
    return _matmul("int8_matmul_t", x, q, q.shape[-1], q.shape[0], ok, "x [M, R], q int8 [C, R]")


def packed_matmul(x, p, s=None):
    """f32 [M, C] = (x [M, R] @ q) * s for q [R, C] (int8 or f32) packed as p [C/64, R, 64]
    (meshlm.quant.pack_panels) and per-column scales s [C] (None: unscaled). CPU only."""
    C = p.shape[0] * PANEL
    if s is not None and s.shape != (C,):
        raise ValueError(f"packed_matmul wants s [{C}]; got {s.shape}")
    ok = p.ndim == 3 and p.shape[2] == PANEL and p.dtype in (jnp.int8, jnp.float32)
    target = "int8_matmul_p" if p.dtype == jnp.int8 else "f32_matmul_p"
    s = jnp.zeros((0,), jnp.float32) if s is None else s.astype(jnp.float32)
    return _matmul(target, x, p, p.shape[1], C, ok, f"x [M, R], packed p int8 or f32 [C/{PANEL}, R, {PANEL}]", s)


CACHE_DTYPES = (jnp.float32, jnp.bfloat16)  # KV caches the kernels read as stored


def _cache_dtype(k, v):
    """The dtype the kernels read the cache k, v in: theirs when both are f32 or both bf16, else f32
    (a copy)."""
    return k.dtype if k.dtype == v.dtype and k.dtype in CACHE_DTYPES else jnp.float32


def decode_attention(q, k, v, positions):
    """o f32 [B, K, G, D]: q [B, K, G, D] (one position per row, roped) against the cache k, v
    [B, S, K, D] (f32 or bf16, read as stored) at positions 0..positions[b] (all S when >= S),
    softmax scaled by D^-1/2. CPU only."""
    B, K, G, D = q.shape
    if k.ndim != 4 or k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (B, K, D) or \
            positions.shape != (B,):
        raise ValueError(f"decode_attention wants q [B, K, G, D], k, v [B, S, K, D], positions [B]; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}, positions {positions.shape}")
    f32, ct = jnp.float32, _cache_dtype(k, v)
    return _ffi("meshlm_decode_attention", [q.shape], q.astype(f32), k.astype(ct), v.astype(ct),
                positions.astype(jnp.int32), scale=np.float32(1.0 / math.sqrt(D)))[0]


def decoder_layer(x, positions, cos, sin, w: dict, k, v, eps: float, rope_half: bool):
    """One decode layer of the Llama family on one device (decoder_layer.cc): x f32 [B, E] at
    positions [B] with RoPE tables cos, sin [B, R/2]; w: norm1, norm2 [E] and the packed weights
    qkv (q|k|v), o, gu (gate|up), d: {"p": int8, "s": column scales} or {"p": f32}; k, v f32 or
    bf16 [B, S, K, D] this layer's cache. -> (x', k', v'), the cache updated in place. CPU only."""
    f32 = jnp.float32

    def pair(m):
        return m["p"], m["s"] if "s" in m else jnp.zeros((0,), f32)

    args = (x.astype(f32), positions.astype(jnp.int32), cos, sin, w["norm1"], *pair(w["qkv"]), *pair(w["o"]),
            w["norm2"], *pair(w["gu"]), *pair(w["d"]), k, v)
    if k.dtype != v.dtype or k.dtype not in CACHE_DTYPES:
        raise ValueError(f"decoder_layer wants an f32 or bf16 cache; got k {k.dtype}, v {v.dtype}")
    shapes = [jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return tuple(_ffi("meshlm_decoder_layer", shapes, *args, aliases={14: 1, 15: 2},
                      eps=np.float32(eps), rope_half=np.int32(rope_half)))


def argmax(x):
    """int32 [B]: the first index of each row's max of x f32 [B, V]; 0 for a row with a NaN. CPU only."""
    if x.ndim != 2:
        raise ValueError(f"argmax wants x [B, V]; got {x.shape}")
    return _ffi("meshlm_argmax", [x.shape[:1]], x.astype(jnp.float32), dtype=jnp.int32)[0]
