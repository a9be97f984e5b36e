"""`meshlm bench`: measured prefill/decode latency, tokens/s, MFU and MBU beside the cost model's
prediction for the same layouts and shapes (meshlm.bench)."""

from __future__ import annotations

import argparse
import sys

from meshlm.cli import int_list, positive_int
from meshlm.cli.generate import add_steps_arg


def register(sub) -> None:
    p = sub.add_parser("bench", help="measured vs predicted latency per layout, batch and input length",
                       description="Run the engine per configuration (warm-up excluded, compile time reported on "
                                   "its own): time to first token, decode time per token p50/p90/p99, tokens/s, "
                                   "MFU and MBU against the chip spec, beside the cost model's prediction for the "
                                   "same layout and shapes, with the relative error.")
    p.add_argument("--model", default="default", help="checkpoint (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", type=int_list, default=[1, 4, 16], help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int_list, default=[128, 512], help="comma-separated prompt lengths")
    p.add_argument("--gen-len", type=positive_int, default=64, help="decode steps timed per configuration")
    p.add_argument("--quantize", default="none",
                   help="comma-separated weight formats: none (f32 on CPU, bf16 on accelerators), int8")
    p.add_argument("--kv-cache", default="auto",
                   help="comma-separated KV cache formats: auto (the activation dtype: f32 on CPU), f32, bf16")
    p.add_argument("--layouts", default="planner",
                   help="comma-separated layout pairs: planner or PREFILL:DECODE (e.g. wg-xyz/heads:ws2d/batch)")
    p.add_argument("--devices", type=positive_int, help="devices to use; on a CPU-only host, simulate N devices")
    p.add_argument("--mesh", help="mesh XxYxZ (default: the planner's choice)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="runs timed per configuration: decode in each, prefill at least this often (median; short "
                        "ones up to 9 within ~1 s)")
    p.add_argument("--visits", type=positive_int, default=1,
                   help="measure the whole list of configurations this many times over, each visit a fresh "
                        "deployment; a configuration's TTFT and decode p50 are the medians of its visits' (3 keeps "
                        "a slow stretch of a shared host out of the numbers; default: 1)")
    add_steps_arg(p)
    p.add_argument("--host-check", action=argparse.BooleanOptionalAction, default=True,
                   help="after each configuration, time the calibration's memory-bandwidth pass (<1 s in all) and "
                        "say whether the host still runs at the chip spec's speed (default: on)")
    p.add_argument("--json", dest="json_out", help="write every row (and the error summary) to this JSON file")
    p.add_argument("--plot", help="write decode tokens/s vs batch, measured and predicted, to this PNG")
    p.set_defaults(func=run)


def _weights(spec: str) -> list[str | None]:
    from meshlm.errors import MeshlmError

    out: list[str | None] = []
    for w in spec.split(","):
        if w not in ("none", "int8"):
            raise MeshlmError(f"--quantize: expected none or int8 (comma-separated), got {w!r}")
        out.append(None if w == "none" else w)
    return out


def _kv_caches(spec: str) -> list[str | None]:
    from meshlm.errors import MeshlmError
    from meshlm.layouts import KV_FORMATS

    out: list[str | None] = []
    for f in spec.split(","):
        if f not in ("auto", *KV_FORMATS):
            raise MeshlmError(f"--kv-cache: expected auto, {', '.join(KV_FORMATS)} (comma-separated), got {f!r}")
        out.append(None if f == "auto" else f)
    return out


def run(args) -> int:
    from meshlm.mesh import simulate_cpu_devices

    mesh_n = None
    if args.mesh:
        from meshlm.layouts import MeshShape

        mesh_n = MeshShape.parse(args.mesh).n
    n = args.devices or mesh_n
    if n:
        simulate_cpu_devices(n)
    import jax

    from meshlm import bench
    from meshlm.layouts import MeshShape

    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    weights, kv_caches = _weights(args.quantize), _kv_caches(args.kv_cache)
    pairs = [p.strip() for p in args.layouts.split(",") if p.strip()]
    host = bench.load_host(args.model, progress=sys.stderr.isatty())
    cfgs = bench.configs(pairs, weights, args.batch, args.input_len, args.gen_len, kv_caches)
    dev = jax.devices()[0]
    print(f"{host.cfg.name} on {n or len(jax.devices())} x {dev.device_kind} ({dev.platform}); "
          f"gen {args.gen_len} tokens, greedy; times in ms", flush=True)
    print(bench.HEADER, flush=True)
    def save(rows: list[dict], complete: bool = False) -> None:
        """Every row so far (a long grid killed midway keeps what it measured)."""
        if args.json_out:
            bench.write_json(args.json_out, {**bench.machine(), "model": host.cfg.name, "gen_len": args.gen_len,
                                             "repeats": args.repeats, "visits": args.visits, "complete": complete,
                                             "summary": bench.error_summary(rows),
                                             "host_check": bench.host_summary(rows),
                                             "rows": rows}, quiet=not complete)

    rows = bench.run(host, cfgs, n_devices=n, mesh=mesh, repeats=args.repeats,
                     log=lambda line: print(line, flush=True), on_row=save, steps_per_dispatch=args.steps_per_dispatch,
                     host_check=args.host_check, visits=args.visits,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary = bench.error_summary(rows)
    for line in bench.summary_lines(summary, rows[0]["chip"]) + bench.host_lines(bench.host_summary(rows)):
        print(line)
    save(rows, complete=True)
    if args.plot:
        from meshlm.deploy import local_chip

        bench.plot(rows, args.plot, chip=local_chip(n or len(jax.devices())))
        print(f"wrote {args.plot}")
    return 0
