"""The one-row packed matmul (the decode step's weight streaming) against the size of the weights it
streams: where a working set stops fitting the host's caches and the rate drops to the memory's.

    python benchmarks/stream_sizes.py [--weights f32,int8] [--mib 32,64,128,256,512] [--repeats 9]
                                      [--out benchmarks/results/stream_sizes.json]

A chain of [1024, 4096] / [4096, 1024] weights (as `meshlm calibrate`'s matmul curve), packed as the
engine stores them on one CPU device (int8 with its column scales, so x stays at unit size), of
about --mib MiB per point; one row of x through all of them per call, the median of --repeats
calls. On the Intel development VM (480 MiB L3) f32 read 51-54 GB/s up to 64 MiB and 28 from 256
MiB on (docs/performance.md): the calibrated bandwidth is one of these regimes, a model's weights
may sit in another.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import kernels, quant
from meshlm.bench import write_json
from meshlm.calibrate import CURVE_E as E, CURVE_F as F
from meshlm.cli import int_list


def chain(fmt: str, mib: int, rng) -> list:
    """[(packed weight, scales or None)] of about mib MiB, alternating [E, F] and [F, E] (even count)."""
    per = E * F * (1 if fmt == "int8" else 4)
    n = max(2, 2 * round(mib * 2**20 / per / 2))
    out = []
    for i in range(n):
        R, C = (E, F) if i % 2 == 0 else (F, E)
        w = (rng.standard_normal((R, C)) / np.sqrt(R)).astype(np.float32)
        if fmt == "int8":
            q = quant.quantize(w)
            out.append((jnp.asarray(quant.pack_panels(q["q"])), jnp.asarray(q["s"])))
        else:
            out.append((jnp.asarray(quant.pack_panels(w)), None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="f32,int8")
    ap.add_argument("--mib", type=int_list, default=[32, 64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/stream_sizes.json")
    args = ap.parse_args()
    if not kernels.available():
        print(f"kernels unavailable: {kernels.reason()}")
        return 2

    @jax.jit
    def run(x, ws):
        for p, s in ws:
            x = kernels.packed_matmul(x, p, s)
        return x

    rng = np.random.default_rng(0)
    rows = []
    for fmt in args.weights.split(","):
        for mib in args.mib:
            ws = chain(fmt, mib, rng)
            x = jnp.asarray(rng.standard_normal((1, E)).astype(np.float32))
            jax.block_until_ready(run(x, ws))  # compile, and the first touch of every page
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                jax.block_until_ready(run(x, ws))
                ts.append(time.perf_counter() - t)
            nbytes = sum(p.size * p.dtype.itemsize for p, _ in ws)
            med = statistics.median(ts)
            rows.append({"weights": fmt, "bytes": nbytes, "median_s": med, "best_s": min(ts),
                         "gb_per_s": nbytes / med / 1e9, "loadavg_1m": os.getloadavg()[0]})
            print(f"{fmt:4s} {nbytes / 2**20:6.0f} MiB: {med * 1e3:8.2f} ms  {nbytes / med / 1e9:5.1f} GB/s "
                  f"(best {nbytes / min(ts) / 1e9:5.1f})", flush=True)
            del ws
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
