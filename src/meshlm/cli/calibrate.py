"""`meshlm calibrate`: measure the local devices and write a chip spec for the planner."""

from __future__ import annotations

import json
from pathlib import Path

from meshlm.cli import positive_int


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure local FLOP/s, memory and collective bandwidth, the engine's "
                                         "overheads; write a chip spec",
                       description="Measure matmul FLOP/s per dtype (f32, bf16, the int8 path) and against the "
                                   "activation's rows M, memory bandwidth, collective bandwidth/latency of the local "
                                   "devices, and the engine's fixed costs (per pass, per layer, per sampled logit, per "
                                   "attention score) on tiny models; write a chip spec that --hardware PATH (or "
                                   "--hardware local, the last one written to the default path) accepts. About a "
                                   "minute (--quick: a rough one in ~20 s).")
    p.add_argument("--out", help="where to write the spec (default: $MESHLM_HOME/local.json, "
                                 "~/.cache/meshlm/local.json)")
    p.add_argument("--devices", type=positive_int, help="on a CPU-only host: simulate N devices")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer samples and tiny models (rough numbers)")
    p.add_argument("--json", action="store_true", help="print the spec as JSON on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    if args.devices:
        from meshlm.mesh import simulate_cpu_devices

        simulate_cpu_devices(args.devices)
    from meshlm import calibrate as cal_mod
    from meshlm.engine_costs import calibrate_engine
    from meshlm.hardware import chip_from_dict, local_spec_path

    log = (lambda m: print(m, file=sys.stderr))
    cal = cal_mod.calibrate(quick=args.quick, log=log)
    compute = "f32" if cal.platform == "cpu" else "bf16"  # the dtype the engine computes in there
    spec = cal_mod.to_chip_dict(cal, compute)
    fields, samples = calibrate_engine(spec, quick=args.quick, log=log)
    spec.update(fields)
    chip_from_dict(spec, where="measured spec")  # the planner must accept what we write
    out = Path(args.out) if args.out else local_spec_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=2) + "\n")
    if args.json:
        print(json.dumps(spec, indent=2))
    else:
        g = 1e9
        print(f"{cal.n_devices} x {cal.device_kind} ({cal.platform})")
        for d, v in cal.matmul_flops.items():
            print(f"  matmul {d:5s} {v / g:10.2f} GFLOP/s per device")
        print(f"  memory       {cal.mem_bw / g:10.2f} GB/s per device")
        if cal.n_devices > 1:
            print(f"  all-gather   {cal.collective_bw / g:10.2f} GB/s per device, latency {cal.collective_latency_s * 1e6:.0f} us")
        for w, pts in cal.matmul_curve.items():
            print(f"  matmul {w:5s} vs M: " + ", ".join(f"{m}: {r / g:.0f}" for m, r in pts) + " GFLOP/s")
        for w, pts in cal.stream_curve.items():
            print(f"  stream {w:5s} vs MiB: " + ", ".join(f"{b / 2**20:g}: {r / g:.1f}" for b, r in pts) + " GB/s")
        ms = 1e3
        print(f"  engine overhead per pass  prefill {spec['pass_overhead_s'].get('prefill', 0) * ms:.2f} ms, "
              f"decode {spec['pass_overhead_s'].get('decode', 0) * ms:.2f} ms")
        print(f"  engine overhead per layer prefill {spec['layer_overhead_s'].get('prefill', 0) * ms:.3f} ms, "
              f"decode {spec['layer_overhead_s'].get('decode', 0) * ms:.3f} ms")
        kv, curve = spec["kv_elem_s"], spec.get("prefill_score_curve", [])
        per_score = ", ".join(f"{v * 1e9:.3f}" for _, v in curve)
        print(f"  sampling {spec['logit_elem_s'] * 1e9:.3f} ns per logit; attention beyond FLOPs and bandwidth: "
              f"prefill {per_score} ns per score (batch {', '.join(str(b) for b, _ in curve)}), decode "
              f"{kv.get('decode', 0) * 1e9:.3f} ns per cached K/V element ("
              + ", ".join(f"{fmt} {v * 1e9:.3f}" for fmt, v in spec.get("kv_format_elem_s", {}).items())
              + "); prefill "
              f"{spec['act_elem_s'].get('prefill', 0) * 1e9:.3f} ns per activation element")
        print(f"  {'tiny model':40s} {'measured ms':>11s} {'fitted ms':>9s}")
        for s in samples:
            what = f"{s['phase']} Y={s['n_layers']} V={s['vocab']} B={s['batch']} L={s['input_len']} K={s['kv_heads']} E={s['d_model']}"
            print(f"  {what:40s} {s['measured_s'] * ms:11.2f} {s['fitted_s'] * ms:9.2f}")
        print(f"wrote {out}")
    return 0
