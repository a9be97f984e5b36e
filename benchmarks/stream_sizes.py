"""The one-row packed matmul (the decode step's weight streaming) against the size of the weights it
streams, beside a plain read of the same size: where a working set stops fitting the host's caches
and the rate drops to the memory's, and how close the kernels come to the memory's own rate.

    python benchmarks/stream_sizes.py [--weights f32,int8] [--mib 16,32,64,128,256,512] [--rounds 3]
                                      [--threads 1,2] [--no-read] [--out benchmarks/results/stream_sizes.json]

`meshlm calibrate`'s stream curve (calibrate.measure_stream_curve) at the sizes given, --rounds times
over: one row of x through a chain of about --mib MiB of weights packed as the engine stores them on
one device, read again and again in a call. On the Intel development VM (480 MiB L3) f32 read 51-54
GB/s up to 64 MiB and 28 from 256 MiB on; on the Zen 4 one (32 MiB L3) 60-87 GB/s at 16 MiB and
26-29 from 64 MiB on (docs/performance.md): the calibrated bandwidth is one of these regimes, a
model's weights may sit in another, and the cost model reads the curve at the model's working set.

Each round also reads a buffer of each size with no work between the loads (benchmarks/plain_read.cc,
built like the kernels; the same software prefetch as the int8 stream on AVX2) on each count of
--threads, read again and again until as many bytes as a curve's call, median of 7: the ceiling the
curves are read against, each curve's points also given as a fraction of the reads just before and
after it (the host's rate moves within minutes). On the Zen 2 VM (2026-12-07 16:33, 3 rounds) one
thread read 16-17 GB/s from memory and two 28-33; from 64 MiB on f32 streamed at 98-104% of the
two-thread read and int8 at 83-91%.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
from pathlib import Path

import jax
import numpy as np

from meshlm import calibrate
from meshlm.bench import machine, write_json
from meshlm.cli import int_list

READ_PREFETCH = 4096  # bytes ahead into L2, as the int8 stream on AVX2 (matmul.h: stream_ahead)


def plain_reader():
    """meshlm_plain_read from benchmarks/plain_read.cc, compiled (and cached) as the kernels are."""
    from meshlm.kernels.build import build

    src = Path(__file__).resolve().parent / "plain_read.cc"
    lib = ctypes.CDLL(str(build([src], "plain_read", str(src.parent), "plain_read")))
    fn = lib.meshlm_plain_read
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.POINTER(ctypes.c_uint64)]
    fn.restype = ctypes.c_double
    return fn


def read_buffers(sizes: list[int]) -> dict:
    """{bytes: a buffer of that many random bytes}, made once for every read of a run."""
    return {b: np.random.default_rng(0).integers(0, 256, b, dtype=np.uint8) for b in sizes}


def nearest(sizes, b: int) -> int:
    """The size of `sizes` closest to b (a curve's point is whole matrix pairs, not exactly --mib)."""
    return min(sizes, key=lambda s: abs(s - b))


def read_rates(fn, bufs: dict, threads: list[int], call_bytes: int, repeats: int = 7) -> dict:
    """{(threads, bytes): bytes/s}: the median of `repeats` calls, each reading the buffer of that
    many bytes again and again until call_bytes, the (threads, size) points timed round-robin."""
    points = [(t, b) for b in bufs for t in threads]
    passes = {b: max(1, -(-call_bytes // b)) for b in bufs}
    times: dict = {p: [] for p in points}
    for rep in range(repeats + 1):  # the first round warms up (page faults, caches)
        for t, b in points:
            s = fn(bufs[b].ctypes.data, b, t, passes[b], READ_PREFETCH, None)
            if rep:
                times[(t, b)].append(s)
    return {(t, b): passes[b] * b / statistics.median(times[(t, b)]) for t, b in points}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="f32,int8")
    ap.add_argument("--mib", type=int_list, default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int_list, default=sorted({1, os.cpu_count() or 1}),
                    help="thread counts of the plain read (default: 1 and all cores)")
    ap.add_argument("--no-read", action="store_true", help="skip the plain read")
    ap.add_argument("--out", default="benchmarks/results/stream_sizes.json")
    args = ap.parse_args()
    mesh = calibrate._mesh(jax.devices()[:1])
    reader = None if args.no_read else plain_reader()
    sizes = [m << 20 for m in args.mib]
    bufs = read_buffers(sizes) if reader is not None else {}
    top = max(args.threads)

    def reads(r):  # one plain read of every size and thread count, as rows
        if reader is None:
            return {}
        rates = read_rates(reader, bufs, args.threads, calibrate.STREAM_CALL_BYTES)
        print("  read: " + ", ".join(f"{b >> 20} MiB x{t} {bw / 1e9:.1f}" for (t, b), bw in rates.items()) + " GB/s")
        rows.extend({"round": r, "weights": f"read x{t}", "bytes": b, "gb_per_s": bw / 1e9,
                     "loadavg_1m": os.getloadavg()[0]} for (t, b), bw in rates.items())
        return rates

    rows: list[dict] = []
    for r in range(args.rounds):
        before = reads(r)
        for fmt in args.weights.split(","):
            pts = calibrate.measure_stream_curve(mesh, 1, fmt, "f32", sizes)
            after = reads(r)  # each curve between two reads: the host's rate moves within minutes
            for b, bw in pts:
                row = {"round": r, "weights": fmt, "bytes": b, "gb_per_s": bw / 1e9, "loadavg_1m": os.getloadavg()[0]}
                if after:
                    near = nearest(sizes, b)
                    row["vs_read"] = bw / ((before[(top, near)] + after[(top, near)]) / 2)
                rows.append(row)
            before = after
    print_table(rows)
    write_json(args.out, {"machine": machine(), "llc_bytes": calibrate.llc_bytes(), "read_prefetch": READ_PREFETCH,
                          "rows": rows})
    return 0


def print_table(rows: list[dict]) -> None:
    """Median GB/s over the rounds per size (rows) and stream (columns: the curves' weights, the
    reads), and each curve against the most-threads read taken around it (median ratio)."""
    kinds = list(dict.fromkeys(r["weights"] for r in rows))
    curves = [k for k in kinds if not k.startswith("read")]
    reads_ = [k for k in kinds if k.startswith("read")]
    ratio = [k for k in curves if any("vs_read" in r for r in rows if r["weights"] == k)]

    def med(k, b, field="gb_per_s"):
        v = [r[field] for r in rows if r["weights"] == k and r["bytes"] == b and field in r]
        return statistics.median(v) if v else None

    read_sizes = sorted({r["bytes"] for r in rows if r["weights"] in reads_})
    sizes = sorted({r["bytes"] for r in rows if r["weights"] in curves}) or read_sizes
    head = [f"{k:>8}" for k in curves + reads_] + [f"{k + '/read':>10}" for k in ratio]
    print(f"{'MiB':>6} | " + " | ".join(head) + "   (GB/s, medians of the rounds; a curve's point is the best rate"
          " at or past its size, as calibrate keeps it)")
    for b in sizes:
        near = nearest(read_sizes, b) if read_sizes else None
        cells = [med(k, b) for k in curves] + [med(k, near) for k in reads_]
        out = [f"{c:8.1f}" if c is not None else f"{'-':>8}" for c in cells]
        out += [f"{med(k, b, 'vs_read'):10.0%}" for k in ratio]
        print(f"{b / 2**20:6.0f} | " + " | ".join(out))


if __name__ == "__main__":
    raise SystemExit(main())
