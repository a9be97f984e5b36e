"""The one-row packed matmul (the decode step's weight streaming) against the size of the weights it
streams: where a working set stops fitting the host's caches and the rate drops to the memory's.

    python benchmarks/stream_sizes.py [--weights f32,int8] [--mib 16,32,64,128,256,512] [--rounds 3]
                                      [--out benchmarks/results/stream_sizes.json]

`meshlm calibrate`'s stream curve (calibrate.measure_stream_curve) at the sizes given, --rounds times
over: one row of x through a chain of about --mib MiB of weights packed as the engine stores them on
one device, read again and again in a call. On the Intel development VM (480 MiB L3) f32 read 51-54
GB/s up to 64 MiB and 28 from 256 MiB on; on the Zen 4 one (32 MiB L3) 60-87 GB/s at 16 MiB and
26-29 from 64 MiB on (docs/performance.md): the calibrated bandwidth is one of these regimes, a
model's weights may sit in another, and the cost model reads the curve at the model's working set.
"""

from __future__ import annotations

import argparse
import os

import jax

from meshlm import calibrate
from meshlm.bench import machine, write_json
from meshlm.cli import int_list


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="f32,int8")
    ap.add_argument("--mib", type=int_list, default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/stream_sizes.json")
    args = ap.parse_args()
    mesh = calibrate._mesh(jax.devices()[:1])
    rows = []
    for r in range(args.rounds):
        for fmt in args.weights.split(","):
            pts = calibrate.measure_stream_curve(mesh, 1, fmt, "f32", [m << 20 for m in args.mib])
            rows += [{"round": r, "weights": fmt, "bytes": b, "gb_per_s": bw / 1e9,
                      "loadavg_1m": os.getloadavg()[0]} for b, bw in pts]
    write_json(args.out, {"machine": machine(), "llc_bytes": calibrate.llc_bytes(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
