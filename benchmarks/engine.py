"""End-to-end generation with the engine: time to first token and decode time per token for a
real checkpoint (default SmolLM2-135M-Instruct), per prefill/decode layout pair, beside the cost
model's prediction for the same shapes.

    python benchmarks/engine.py [--model default] [--devices 8] [--mesh 2x2x2] [--weights f32|int8]
                                [--pairs planner,wg-xyz/heads:ws2d/batch,...] [--batch 1]
                                [--prompt-len 64] [--tokens 32] [--out benchmarks/results/engine.json]

Each pair is warmed up (compiled) first; the timed run prefills `batch` prompts of prompt-len
tokens and decodes `tokens` tokens (greedy, EOS ignored). NOTE: on a CPU-only host the devices
are SIMULATED (they share the cores; collectives are memory copies): the numbers show the
engine's overheads and relative layout costs on this host, not interconnect speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--weights", default=None, choices=("int8",), help="int8: quantize at load")
    ap.add_argument("--pairs", default="planner,ws2d/heads:ws2d/heads,wg-xyz/heads:ws2d/batch")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine.json"))
    args = ap.parse_args(argv)

    from meshlm.mesh import simulate_cpu_devices

    simulate_cpu_devices(args.devices)
    import jax

    from meshlm.deploy import deploy, measured_vs_predicted
    from meshlm.layouts import MeshShape
    from meshlm.sampling import SamplingParams

    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    rows = []
    for pair in args.pairs.split(","):
        pre, dec = (None, None) if pair == "planner" else pair.split(":")
        d = deploy(args.model, n_devices=args.devices, mesh=mesh, prefill=pre, decode=dec, quantize=args.weights,
                   slots=args.batch, max_len=args.prompt_len + args.tokens + 8, batch=args.batch,
                   input_len=args.prompt_len, gen_len=args.tokens, progress=False)
        prompts = [[(7 * i + 13 * b) % 1000 + 100 for i in range(args.prompt_len)] for b in range(args.batch)]
        t = time.perf_counter()
        d.engine.generate_ids(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
        compile_s = time.perf_counter() - t
        d.engine.generate_ids(prompts, sp)
        m = measured_vs_predicted(d, args.prompt_len)
        rows.append({"pair": pair, "prefill": d.layouts["prefill"].short, "decode": d.layouts["decode"].short,
                     "mesh": str(d.layouts["decode"].mesh), "weights": d.layouts["decode"].weights,
                     "compile_s": compile_s, **{f"{ph}_{k}": v for ph, r in m.items() for k, v in r.items()}})
        r = rows[-1]
        print(f"{pair:28s} {r['prefill']:>13s} {r['decode']:>11s} @{r['mesh']} {r['weights']:4s}  "
              f"ttft {r['prefill_measured_s'] * 1e3:8.1f} ms (pred {r['prefill_predicted_s'] * 1e3:7.1f})  "
              f"decode {r['decode_measured_s_per_token'] * 1e3:7.1f} ms/tok "
              f"(pred {r['decode_predicted_s_per_token'] * 1e3:6.1f})  compile {compile_s:5.1f} s", flush=True)
    out = {"host": platform.node(), "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
           "n_devices": args.devices, "chip_spec": d.chip.name, "model": args.model, "batch": args.batch,
           "prompt_len": args.prompt_len, "tokens": args.tokens, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
