"""Hand-written CPU kernels, called from jitted JAX code as XLA FFI custom calls.

`int8_matmul(x, q)` = x @ q and `int8_matmul_t(x, q)` = x @ q.T for f32 x [M, R] and an int8
weight (unscaled): they read each int8 weight once and widen it in registers (int8_matmul.cc),
which XLA:CPU's own int8 paths do not. The library is compiled on first use with the system g++
(cached under $MESHLM_HOME/kernels) and registered for platform "cpu" only; call these on CPU
(e.g. from a `jax.lax.platform_dependent` branch). `available()` says whether they can be used;
when not (MESHLM_KERNELS=0, no compiler, a failed build), `reason()` says why, logged once."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from meshlm.kernels.build import BuildError, build

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int8_matmul.cc")
_TARGETS = ("meshlm_int8_matmul", "meshlm_int8_matmul_t")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "lib": ctypes.CDLL (kept alive: XLA holds its pointers)


def _load() -> tuple[bool, str]:
    if os.environ.get("MESHLM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "int8 CPU kernel disabled by MESHLM_KERNELS=0; using the XLA int8 path"
    try:
        lib_path = build(_SOURCE, jax.ffi.include_dir(), f"jax {jax.__version__}")
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        for name in _TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (BuildError, OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
        return False, f"int8 CPU kernel unavailable ({e}); using the XLA int8 path"
    _state["lib"] = lib
    return True, f"int8 CPU kernel loaded from {lib_path}"


def _ensure() -> None:
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["reason"] = _load()
            (log.info if _state["ok"] else log.warning)(_state["reason"])


def available() -> bool:
    """True when the kernels are built and registered (builds them on the first call)."""
    _ensure()
    return _state["ok"]


def reason() -> str:
    """Why the kernels are (un)available, in one line."""
    _ensure()
    return _state["reason"]


def _call(name: str, x, q, transposed: bool):
    R, C = q.shape[::-1] if transposed else q.shape
    if x.ndim != 2 or q.ndim != 2 or x.shape[1] != R or q.dtype != jnp.int8:
        want = "x [M, R], q int8 [C, R]" if transposed else "x [M, R], q int8 [R, C]"
        raise ValueError(f"{name} wants {want}; got x {x.shape}, q {q.shape} {q.dtype}")
    if not available():
        raise RuntimeError(reason())
    out = jax.ShapeDtypeStruct((x.shape[0], C), jnp.float32)
    y = jax.ffi.ffi_call(f"meshlm_{name}", out, vmap_method="sequential")(x.astype(jnp.float32), q)
    axes = _varying_axes(x, q)
    return jax.lax.pcast(y, axes, to="varying") if axes else y


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
    return _call("int8_matmul", x, q, transposed=False)


def int8_matmul_t(x, q):
    """f32 [M, C] = x [M, R] @ q.T for q int8 [C, R] (unscaled). CPU only."""
    return _call("int8_matmul_t", x, q, transposed=True)
