"""Packed (panel-major) weights on one CPU device: the kernel (kernels.packed_matmul) vs XLA on the
unpacked weight vs XLA on a row-major copy, per number of activation rows M; picks the crossovers
of quant.packed_kernel_max_m (on AVX-512 the kernel at any M since 2026-12-08, for f32 too).

    python benchmarks/packed_matmul.py [--weights f32,int8] [--m 1,4,16,64,128,256,512]
                                       [--layers 30] [--repeats 5]
                                       [--out benchmarks/results/packed_matmul.json]

A chain of `layers` SmolLM2 FFN pairs ([576, 1536] then [1536, 576]; 212 MB f32, 53 MB int8 for 30),
each matmul fed by the previous one's output. "kernel": the packed kernel; "xla_unpacked": the XLA
path the engine takes above the crossover (a transpose back to [R, C], then the f32 GEMM, int8
dequantized on the way); "xla_row_major": XLA on weights stored row-major (what several devices
store; int8 through quant.xla_dot_rows). Medians of `repeats` runs, the ways interleaved.
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
from meshlm.cli import int_list

E, F = 576, 1536


def _chain(mm, c):
    @jax.jit
    def run(x, ws):
        for a, b in ws:
            # c keeps the chained activation near unit size: one that grows to inf or NaN, or
            # shrinks into denormals, takes other (slower or faster) paths than real activations
            x = mm(mm(x, a), b) * c
        return x
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="f32,int8")
    ap.add_argument("--m", type=int_list, default=[1, 4, 16, 64, 128, 256, 512])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/packed_matmul.json")
    args = ap.parse_args()
    if not kernels.available():
        print(f"kernels unavailable: {kernels.reason()}")
        return 2
    rng = np.random.default_rng(0)
    rows = []
    for wts in args.weights.split(","):
        def make(R, C, wts=wts):
            w = (rng.standard_normal((R, C)) / np.sqrt(R)).astype(np.float32)
            return w if wts == "f32" else quant.quantize(w)["q"]
        mats = [(make(E, F), make(F, E)) for _ in range(args.layers)]
        row_major = [(jnp.asarray(a), jnp.asarray(b)) for a, b in mats]
        packed = [(jnp.asarray(quant.pack_panels(a)), jnp.asarray(quant.pack_panels(b))) for a, b in mats]
        xla = (lambda x, w: jnp.dot(x, w)) if wts == "f32" else quant.xla_dot_rows
        a, b = mats[0]  # |x @ a| ~ |x| rms(a) sqrt(E): undo a layer's gain
        c = float(1 / (np.sqrt(np.mean(np.square(a, dtype=np.float64)) * E)
                       * np.sqrt(np.mean(np.square(b, dtype=np.float64)) * F)))
        ways = {"kernel": (_chain(kernels.packed_matmul, c), packed),
                "xla_unpacked": (_chain(lambda x, w: xla(x, quant.unpack_panels(w)), c), packed),
                "xla_row_major": (_chain(xla, c), row_major)}
        wbytes = sum(a.nbytes + b.nbytes for a, b in mats)
        for M in args.m:
            x = jnp.asarray(rng.standard_normal((M, E), np.float32))
            for fn, ws in ways.values():
                jax.block_until_ready(fn(x, ws))  # compile
            times: dict = {k: [] for k in ways}
            for _ in range(args.repeats):
                for k, (fn, ws) in ways.items():
                    t = time.perf_counter()
                    jax.block_until_ready(fn(x, ws))
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"weights": wts, "M": M, "weight_bytes": wbytes, **{f"{k}_s": v for k, v in med.items()},
                         "loadavg_1m": os.getloadavg()[0]})
            print(f"{wts:4s} M={M:5d}  " + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in med.items())
                  + f"   (kernel {wbytes / med['kernel'] / 1e9:5.1f} GB/s)", flush=True)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "layers": args.layers,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
