"""`meshlm layouts`: run every layout on the local devices and check it against the reference and
the cost model's byte inventory (one row per ffn, attention, block, phase, mesh)."""

from __future__ import annotations

import json
import math

from meshlm.cli import positive_int
from meshlm.errors import MeshlmError

KINDS_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
               "collective-permute": "CP"}


def register(sub) -> None:
    p = sub.add_parser("layouts", help="run every layout on the local devices: error vs reference, predicted "
                                       "vs measured collective bytes, memory per device")
    p.add_argument("--devices", type=positive_int, default=8,
                   help="devices to use; on a CPU-only host this many simulated CPU devices (default 8)")
    p.add_argument("--mesh", default=None,
                   help="mesh XxYxZ, or a comma list (default: 2x2x2,1x2x4,4x2x1,8x1x1 for 8 devices, "
                        "else the most cubic shape)")
    p.add_argument("--model", default="tiny-palm", help="tiny-palm, tiny-llama, another preset, or a config.json path")
    p.add_argument("--ffn", default=None, help="comma list of FFN layouts (default: all)")
    p.add_argument("--attention", default=None, help="comma list: heads,batch (default: both)")
    p.add_argument("--block", choices=("model", "both"), default="both",
                   help="'both': also run the model with the other block type (parallel/serial)")
    p.add_argument("--weights", choices=("f32", "bf16", "int8"), default="f32",
                   help="weight format; int8 is compared with the reference on the same weights dequantised")
    p.add_argument("--collective-matmul", action="store_true", help="looped collective matmul (§3.5)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--prompt-len", type=positive_int, default=6)
    p.add_argument("--cache-len", type=positive_int, default=16)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


def default_meshes(n: int):
    from meshlm.layouts import MeshShape

    if n == 8:
        return [MeshShape(2, 2, 2), MeshShape(1, 2, 4), MeshShape(4, 2, 1), MeshShape(8, 1, 1)]
    return [min(MeshShape.all_for(n), key=lambda m: (max(m.as_tuple()), -m.x))]


def run(args) -> int:
    from meshlm.mesh import simulate_cpu_devices

    simulate_cpu_devices(args.devices)  # only effective before JAX starts (CPU-only hosts)
    import jax

    from meshlm import reference as ref
    from meshlm.config import load_model_config
    from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, MeshShape
    from meshlm.quant import int8_as_f32
    from meshlm.sharded import ShardedModel
    from meshlm.sharded_verify import Workload, reference_results, run_layout

    devices = jax.devices()
    if len(devices) < args.devices:
        raise MeshlmError(f"{args.devices} devices requested, {len(devices)} available")
    devices = devices[: args.devices]
    meshes = [MeshShape.parse(t) for t in args.mesh.split(",")] if args.mesh else default_meshes(args.devices)
    for m in meshes:
        if m.n != args.devices:
            raise MeshlmError(f"mesh {m} has {m.n} devices, --devices is {args.devices}")
    ffns = _choice(args.ffn, FFN_LAYOUTS, "--ffn")
    attns = _choice(args.attention, ATTN_LAYOUTS, "--attention")
    if args.prompt_len > args.cache_len:
        raise MeshlmError("--prompt-len must not exceed --cache-len")
    base = load_model_config(args.model)
    cfgs = [base]
    if args.block == "both":
        cfgs.append(base.replace(block="serial" if base.block == "parallel" else "parallel"))
    rows = []
    for cfg in cfgs:
        params = ref.init_params(cfg, jax.random.PRNGKey(0))
        oracle = int8_as_f32(params, cfg) if args.weights == "int8" else params
        w = Workload.random(cfg, args.batch, args.prompt_len, args.cache_len)
        expected = reference_results(cfg, oracle, w)
        for m in meshes:
            sm = ShardedModel(cfg, m, devices)
            stored = {}
            for ffn in ffns:
                storage = "1d" if ffn == "ws1d" else "2d"
                if storage not in stored:
                    stored[storage] = sm.shard_params(params, args.weights, storage)
                wbytes = sm.bytes_per_device(stored[storage])
                for attn in attns:
                    lay = Layout(ffn, attn, args.weights, m, collective_matmul=args.collective_matmul)
                    for r in run_layout(sm, stored[storage], lay, w, expected):
                        rows.append({"ffn": ffn, "attention": attn, "block": cfg.block, "phase": r.phase,
                                     "mesh": str(m), "weights": args.weights,
                                     "collective_matmul": args.collective_matmul,
                                     "max_abs_error": r.max_abs_error, "cache_error": r.cache_error,
                                     "predicted_bytes": r.predicted_bytes, "measured_bytes": r.measured_bytes,
                                     "bytes_match": r.bytes_match, "weight_bytes_per_device": wbytes,
                                     "kv_cache_bytes_per_device": r.kv_cache_bytes_per_device,
                                     "compile_s": round(r.compile_s, 3)})
                        if not args.json:
                            _print_row(rows[-1], header=len(rows) == 1)
    if args.json:
        print(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["bytes_match"] or not math.isfinite(r["max_abs_error"])]
    return 1 if bad else 0


def _choice(text, known, flag):
    if text is None:
        return list(known)
    out = [t for t in text.split(",") if t]
    for t in out:
        if t not in known:
            raise MeshlmError(f"{flag}: unknown {t!r}; known: {', '.join(known)}")
    return out


def _fmt_bytes(d: dict) -> str:
    return " ".join(f"{KINDS_SHORT[k]}={int(v)}" for k, v in d.items() if v) or "-"


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'ffn':7} {'attn':5} {'block':8} {'phase':7} {'mesh':6} {'max_err':>8} {'bytes':5} "
              f"{'weights/dev':>11} {'kv/dev':>8}  measured bytes per device (= predicted unless marked)")
    ok = "ok" if r["bytes_match"] else "DIFF"
    line = (f"{r['ffn']:7} {r['attention']:5} {r['block']:8} {r['phase']:7} {r['mesh']:6} {r['max_abs_error']:8.1e} "
            f"{ok:5} {r['weight_bytes_per_device']:11d} {r['kv_cache_bytes_per_device']:8d}  "
            f"{_fmt_bytes(r['measured_bytes'])}")
    if not r["bytes_match"]:
        line += f"  predicted: {_fmt_bytes(r['predicted_bytes'])}"
    print(line, flush=True)
