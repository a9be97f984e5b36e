"""Planner speed: a full PaLM-540B sweep (chips 8-256, batch 1-1024, every layout incl. ws1d,
bf16 and int8, prefill and decode) priced by the cost model. Prints a table, writes JSON.

    python benchmarks/planner_speed.py [--out benchmarks/planner_speed.json] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from meshlm import costmodel
from meshlm.config import preset
from meshlm.costmodel import estimate
from meshlm.hardware import CHIPS
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, PHASES, Layout

CHIP_COUNTS = (8, 16, 32, 64, 128, 256)
BATCHES = tuple(2**i for i in range(11))
WEIGHTS = ("bf16", "int8")


def sweep(cfg, chip) -> tuple[int, int]:
    """(estimates, fitting) over the full grid; every layout, not only the shared-storage ones."""
    n_est = n_fit = 0
    for n in CHIP_COUNTS:
        for mesh in chip.mesh_shapes(n):
            for ffn in FFN_LAYOUTS:
                for attn in ATTN_LAYOUTS:
                    for w in WEIGHTS:
                        lay = Layout(ffn, attn, w, mesh)
                        for phase in PHASES:
                            for b in BATCHES:
                                n_fit += estimate(cfg, chip, lay, phase, b, 2048, 64).fits
                                n_est += 1
    return n_est, n_fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg, chip = preset("palm-540b"), CHIPS["tpu-v4"]
    runs = []
    for i in range(args.repeat):
        costmodel.clear_caches()  # cold: nothing memoised is reused across runs
        t0 = time.perf_counter()
        n_est, n_fit = sweep(cfg, chip)
        runs.append(time.perf_counter() - t0)
    result = {"benchmark": "planner_speed", "model": cfg.name, "hardware": chip.name, "chips": list(CHIP_COUNTS),
              "batches": list(BATCHES), "weights": list(WEIGHTS), "ffn": list(FFN_LAYOUTS),
              "attention": list(ATTN_LAYOUTS), "phases": list(PHASES), "estimates": n_est, "fitting": n_fit,
              "seconds": runs, "best_s": min(runs), "us_per_estimate": 1e6 * min(runs) / n_est,
              "limit_s": 2.0, "passed": min(runs) < 2.0, "machine": platform.processor() or platform.machine(),
              "python": platform.python_version()}
    print(f"{'estimates':>10} {'fitting':>8} {'best (s)':>9} {'us/estimate':>12} {'limit':>6}")
    print(f"{n_est:>10} {n_fit:>8} {min(runs):>9.3f} {result['us_per_estimate']:>12.1f} {'2 s':>6}"
          f"  {'PASS' if result['passed'] else 'FAIL'}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
