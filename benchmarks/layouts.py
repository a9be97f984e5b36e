"""Compile time and step time of every layout on the local devices.

    python benchmarks/layouts.py [--devices 8] [--mesh 2x2x2] [--model tiny-llama] [--weights f32]
                                 [--batch 8] [--prompt-len 32] [--cache-len 64] [--repeats 5]
                                 [--out benchmarks/results/layouts.json]

NOTE: on a CPU-only host the devices are SIMULATED: they share the same cores and "collectives"
are memory copies. Such runs prove correctness and bytes moved (each row also re-checks the error
against the reference and the HLO bytes against meshlm.comm), not communication speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="2x2x2")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--weights", default="f32", choices=("f32", "bf16", "int8"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cache-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--collective-matmul", action="store_true")
    ap.add_argument("--ffn", default=",".join(("ws1d", "ws2d", "wg-x", "wg-xy", "wg-xyz")))
    ap.add_argument("--attention", default="heads,batch")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "layouts.json"))
    args = ap.parse_args(argv)

    from meshlm.mesh import simulate_cpu_devices

    simulate_cpu_devices(args.devices)
    import jax

    from meshlm import reference as ref
    from meshlm.config import load_model_config
    from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, MeshShape
    from meshlm.quant import int8_as_f32
    from meshlm.sharded import ShardedModel
    from meshlm.sharded_verify import Workload, reference_results, run_layout

    cfg = load_model_config(args.model)
    mesh = MeshShape.parse(args.mesh)
    devices = jax.devices()[: mesh.n]
    params = ref.init_params(cfg, jax.random.PRNGKey(0))
    w = Workload.random(cfg, args.batch, args.prompt_len, args.cache_len)
    expected = reference_results(cfg, int8_as_f32(params, cfg) if args.weights == "int8" else params, w)
    sm = ShardedModel(cfg, mesh, devices)
    simulated = devices[0].platform == "cpu"
    note = ", SIMULATED devices: correctness and bytes only, not communication speed" if simulated else ""
    print(f"{cfg.name} on {mesh} ({devices[0].platform}{note})")
    print(f"{'ffn':7} {'attn':6} {'phase':8} {'compile s':>9} {'step ms':>9} {'max err':>8} {'bytes':>5}")
    rows = []
    for ffn in [f for f in args.ffn.split(",") if f in FFN_LAYOUTS]:
        stored = sm.shard_params(params, args.weights, "1d" if ffn == "ws1d" else "2d")
        for attn in [a for a in args.attention.split(",") if a in ATTN_LAYOUTS]:
            lay = Layout(ffn, attn, args.weights, mesh, collective_matmul=args.collective_matmul)
            for r in run_layout(sm, stored, lay, w, expected, timing_repeats=args.repeats):
                rows.append({"ffn": ffn, "attention": attn, "phase": r.phase, "compile_s": r.compile_s,
                             "step_s": r.step_s, "max_abs_error": r.max_abs_error, "bytes_match": r.bytes_match,
                             "measured_bytes": r.measured_bytes})
                print(f"{ffn:7} {attn:6} {r.phase:8} {r.compile_s:9.2f} {r.step_s * 1e3:9.2f} {r.max_abs_error:8.1e} "
                      f"{'ok' if r.bytes_match else 'DIFF':>5}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"model": cfg.name, "mesh": str(mesh), "weights": args.weights, "batch": args.batch,
            "prompt_len": args.prompt_len, "cache_len": args.cache_len, "platform": devices[0].platform,
            "simulated_devices": simulated, "host": platform.node(), "jax": jax.__version__,
            "note": "simulated devices prove correctness and bytes, not communication speed" if simulated else "",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["bytes_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
