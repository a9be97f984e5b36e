"""One prefill-shaped dot, x [M, R] @ w [R, C], at growing M on one CPU device: how its FLOP rate
falls once the rows stop fitting the last-level cache, which the calibration's matmul curve (its top
point M = 4096) does not see (docs/performance.md, Not done: the largest f32 prefill).

    python benchmarks/large_m_dot.py [--m 512,4096,6144,8192,16384] [--shape 576,1536] [--repeats 5]
                                     [--out benchmarks/results/large_m_dot.json]

Three paths per M: plain `jnp.dot` on an f32 weight, and `quant.dot_rows` (what the engine runs) on
the weight packed as f32 panels and as int8 panels with per-column scales. The three are timed in
`repeats` interleaved rounds after a warm-up (`calibrate._interleaved`), the medians kept; the default shape is SmolLM2-135M's FFN (d_model 576,
d_ff 1536).
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import calibrate, quant
from meshlm.bench import write_json
from meshlm.cli import int_list


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int_list, default=[512, 4096, 6144, 8192, 16384])
    ap.add_argument("--shape", type=int_list, default=[576, 1536], help="R,C of the weight")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/large_m_dot.json")
    args = ap.parse_args()
    if len(args.shape) != 2 or args.shape[1] % 64 or args.repeats < 1 or min(args.m) < 1:
        print("--shape must be R,C with C a multiple of 64 (whole panels); --m and --repeats at least 1")
        return 2
    R, C = args.shape
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((R, C), np.float32))
    w_f32 = quant.pack_panels(w)
    w_i8 = quant.pack_panels(jnp.asarray(rng.integers(-127, 128, (R, C), dtype=np.int8)))
    scale = jnp.full((C,), 0.01, jnp.float32)
    paths = {"plain f32 dot": (jax.jit(jnp.dot), w),
             "packed f32": (jax.jit(lambda x, w: quant.dot_rows(x, w, jnp.float32)), w_f32),
             "packed int8": (jax.jit(lambda x, w: quant.dot_rows(x, w, jnp.float32, scale)), w_i8)}
    rows = []
    print(f"x [M, {R}] @ w [{R}, {C}], GFLOP/s (median of {args.repeats})")
    print(f"{'M':>7} {'out MiB':>8} " + " ".join(f"{p:>14}" for p in paths))
    for M in args.m:
        x = jnp.asarray(rng.standard_normal((M, R), np.float32))
        times = calibrate._interleaved([lambda f=f, wt=wt: jax.block_until_ready(f(x, wt)) for f, wt in paths.values()],
                                       args.repeats)
        rates = {p: 2 * M * R * C / t for p, t in zip(paths, times)}
        rows.append({"m": M, "out_bytes": M * C * 4, "flops_per_s": rates})
        print(f"{M:7d} {M * C * 4 / 2**20:8.1f} " + " ".join(f"{r / 1e9:14.0f}" for r in rates.values()), flush=True)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "shape": [R, C], "repeats": args.repeats, "loadavg_1m": os.getloadavg()[0], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
