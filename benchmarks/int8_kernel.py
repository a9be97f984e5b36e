"""int8 weight-only matmul on CPU: the FFI kernel (meshlm.kernels) vs the XLA int8 path
(quant.xla_dot_rows / xla_dot_t) vs an f32 dot with f32 weights.

    python benchmarks/int8_kernel.py [--layers 30] [--m 1,8] [--crossover 1,4,8,16,64,256,1024]
                                     [--repeats 7] [--out benchmarks/results/int8_kernel.json]

"chain": `layers` layers of SmolLM2-shaped weights [576, 3648] and [1536, 576] (90 MB int8 for 30
layers, larger than L3), each matmul fed by the previous one's output so XLA cannot overlap them;
GB/s = int8 weight bytes / time (for f32 the same int8 byte count, so the columns compare times).
"tied": x @ table.T over 4 different [49152, 576] int8 tables chained the same way (113 MB).
"crossover": one [576, 3648] matmul (and x @ q.T with an [8192, 576] table) per M, to pick
quant.KERNEL_MAX_M. Medians of `repeats` runs;
the machine is shared, so the load average is recorded too.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import kernels, quant
from meshlm.bench import write_json
from meshlm.calibrate import _time as median_time  # median after a warm-up (compiling) call

E, F3, F = 576, 3648, 1536


def _time(fn, args, repeats: int) -> float:
    return median_time(fn, *args, repeats=repeats)


def _unit(R: int) -> float:
    """Keeps a chained activation near unit size: int8 uniform in [-127, 127] has std ~73."""
    return 1.0 / (73.0 * R ** 0.5)


def _chain(dot):
    """jit(x, weights) -> x after len(weights)//2 layers of dot(x, a) then dot(h[:, :F], b)."""
    def run(x, ws):
        for a, b in zip(ws[::2], ws[1::2]):
            h = dot(x, a) * _unit(E)
            x = dot(h[:, :F], b) * _unit(F)
        return x
    return jax.jit(run)


def _chain_t(dot):
    def run(x, tables):
        for t in tables:
            x = dot(x, t)[:, :E] * _unit(E)
        return x
    return jax.jit(run)


def _f32_dot_t(x, t):
    return jax.lax.dot_general(x, t, (((1,), (1,)), ((), ())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--m", default="1,8")
    ap.add_argument("--crossover", default="1,4,8,16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "int8_kernel.json"))
    args = ap.parse_args(argv)
    if not kernels.available():
        print(kernels.reason())
        return 1
    rng = np.random.default_rng(0)
    q8 = []
    for _ in range(args.layers):
        q8 += [rng.integers(-127, 128, (E, F3), dtype=np.int8), rng.integers(-127, 128, (F, E), dtype=np.int8)]
    qd = [jax.device_put(q) for q in q8]
    wbytes = sum(q.size for q in q8)
    rows = []

    def record(kind, M, method, secs, nbytes):
        rows.append({"kind": kind, "M": M, "method": method, "ms": secs * 1e3, "int8_GBps": nbytes / secs / 1e9})
        print(f"{kind:9s} M={M:<5d} {method:7s} {secs * 1e3:9.3f} ms  {nbytes / secs / 1e9:6.1f} GB/s int8")

    for M in map(int, args.m.split(",")):
        x = jnp.asarray(rng.normal(size=(M, E)), jnp.float32)
        record("chain", M, "kernel", _time(_chain(kernels.int8_matmul), (x, qd), args.repeats), wbytes)
        record("chain", M, "xla", _time(_chain(quant.xla_dot_rows), (x, qd), args.repeats), wbytes)
        wf = [jnp.asarray(q, jnp.float32) for q in q8]
        record("chain", M, "f32", _time(_chain(jnp.dot), (x, wf), args.repeats), wbytes)
        del wf
    del qd
    tables = [jax.device_put(rng.integers(-127, 128, (49152, E), dtype=np.int8)) for _ in range(4)]
    tbytes = sum(t.size for t in tables)
    for M in map(int, args.m.split(",")):
        x = jnp.asarray(rng.normal(size=(M, E)), jnp.float32)
        record("tied", M, "kernel", _time(_chain_t(kernels.int8_matmul_t), (x, tables), args.repeats), tbytes)
        record("tied", M, "xla", _time(_chain_t(quant.xla_dot_t), (x, tables), args.repeats), tbytes)
        tf = [t.astype(jnp.float32) for t in tables]
        record("tied", M, "f32", _time(_chain_t(_f32_dot_t), (x, tf), args.repeats), tbytes)
        del tf
    del tables
    a, t = jax.device_put(q8[0]), jax.device_put(rng.integers(-127, 128, (8192, E), dtype=np.int8))
    for M in map(int, args.crossover.split(",")):
        x = jnp.asarray(rng.normal(size=(M, E)), jnp.float32)
        record("crossover", M, "kernel", _time(jax.jit(kernels.int8_matmul), (x, a), args.repeats), a.size)
        record("crossover", M, "xla", _time(jax.jit(quant.xla_dot_rows), (x, a), args.repeats), a.size)
        record("crossover_t", M, "kernel", _time(jax.jit(kernels.int8_matmul_t), (x, t), args.repeats), t.size)
        record("crossover_t", M, "xla", _time(jax.jit(quant.xla_dot_t), (x, t), args.repeats), t.size)
    out = {"host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "jax": jax.__version__,
           "layers": args.layers, "repeats": args.repeats, "kernel_max_m": quant.KERNEL_MAX_M, "rows": rows}
    write_json(args.out, out)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
