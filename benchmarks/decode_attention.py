"""The decode-attention kernel (kernels.decode_attention) on one CPU device: how fast it streams the
KV cache, next to the calibration's bandwidth pass timed in the same rounds.

    python benchmarks/decode_attention.py [--batch 1,4,8] [--context 128,1088] [--kv-cache f32,bf16]
                                          [--layers 30] [--rounds 11]
                                          [--out benchmarks/results/decode_attention.json]

Per (cache format, batch, context): a chain of `layers` calls, each over its own K and V cache [B, 2048, 3, 64]
(SmolLM2-135M's heads: 3 KV heads, 3 query heads each, head dim 64) at position context - 1, each
query the last call's output, as a decode step reads its layers; the caches sit on 2 MiB pages, as the
engine's do (MESHLM_HUGEPAGES=0: left on XLA's). The bandwidth pass is
`calibrate.bandwidth_rounds` (the packed f32 matrix-vector product over 128 MiB that `meshlm
calibrate` measures the chip's bandwidth with); every case and it are interleaved round by round so
they see the same host load. "share" is the kernel's bytes/s over the pass's: the fraction of
reachable bandwidth the attention part of a decode step runs at (the rest of the step streams
weights at ~the pass's rate).
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import calibrate, hugepages, kernels
from meshlm.bench import write_json
from meshlm.cli import int_list
from meshlm.sharded import KV_DTYPES

S, K, G, D = 2048, 3, 3, 64


def _case(rng, fmt: str, B: int, context: int, layers: int):
    """(a blocking call running the chain, K and V bytes it reads)."""
    dt = KV_DTYPES[fmt]
    q = jnp.asarray(rng.standard_normal((B, K, G, D), np.float32))
    ks = [jnp.asarray(rng.standard_normal((B, S, K, D), np.float32)).astype(dt) for _ in range(layers)]
    vs = [jnp.asarray(rng.standard_normal((B, S, K, D), np.float32)).astype(dt) for _ in range(layers)]
    pos = jnp.full((B,), context - 1, jnp.int32)
    hugepages.advise((ks, vs))  # as the engine places its cache (engine.py): on 2 MiB pages

    @jax.jit
    def chain(q, ks, vs, pos):
        o = q
        for k, v in zip(ks, vs):
            o = kernels.decode_attention(o, k, v, pos)
        return o

    return (lambda: jax.block_until_ready(chain(q, ks, vs, pos))), B * context * K * D * dt.itemsize * 2 * layers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int_list, default=[1, 4, 8])
    ap.add_argument("--context", type=int_list, default=[128, 1088])
    ap.add_argument("--kv-cache", default="f32,bf16", help="comma-separated cache formats: f32, bf16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    args = ap.parse_args()
    if not kernels.available():
        print(f"kernels unavailable: {kernels.reason()}")
        return 2
    if any(not 1 <= c <= S for c in args.context):
        print(f"--context must be within 1..{S}")
        return 2
    fmts = args.kv_cache.split(",")
    if any(f not in KV_DTYPES for f in fmts):
        print(f"--kv-cache must be among {', '.join(KV_DTYPES)}")
        return 2
    rng = np.random.default_rng(0)
    mesh = calibrate._mesh(jax.devices()[:1])
    bw = calibrate.bandwidth_rounds(mesh, 1, calibrate.bandwidth_mib(1, on_cpu=True))
    cases = [(f, B, c) for f in fmts for B in args.batch for c in args.context]
    calls = [_case(rng, f, B, c, args.layers) for f, B, c in cases]
    times = calibrate._interleaved([lambda: jax.block_until_ready(bw.fn(*bw.args))] + [f for f, _ in calls],
                                   args.rounds)
    bw_rate = bw.units / times[0]
    print(f"bandwidth pass: {bw_rate / 1e9:.1f} GB/s (medians of {args.rounds} interleaved rounds)")
    rows = []
    for (f, B, c), (_, nbytes), t in zip(cases, calls, times[1:]):
        rate = nbytes / t
        rows.append({"kv_cache": f, "batch": B, "context": c, "layers": args.layers, "kv_bytes": nbytes, "seconds": t,
                     "bytes_per_s": rate, "share_of_bandwidth_pass": rate / bw_rate})
        print(f"{f:4s} B={B:3d} context={c:5d}  {t / args.layers * 1e6:8.1f} us/layer  {rate / 1e9:5.1f} GB/s  "
              f"{100 * rate / bw_rate:4.0f}% of the pass", flush=True)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "bandwidth_pass_bytes_per_s": bw_rate, "loadavg_1m": os.getloadavg()[0], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
