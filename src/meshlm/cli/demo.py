"""`meshlm demo`: the planner on the paper's headline case (PaLM 540B on 64 TPU v4 chips, low
latency and high throughput, prefill and decode), printed beside the paper's Table 2; then the
main job: SmolLM2-135M-Instruct answers a prompt on 8 simulated devices, with the layouts used per
phase and predicted vs measured latency (`meshlm.cli.generate.real_model_demo`).

`planner_demo()` returns the rows and `print_planner_demo()` prints them.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshlm.config import preset
from meshlm.costmodel import Estimate
from meshlm.hardware import CHIPS
from meshlm.paper_tables import TABLE23_GEN_LEN, TABLE23_INPUT_LEN, TABLE23_PAPER, Column
from meshlm.planner import best_layout


def planner_demo() -> list[tuple[Column, Estimate]]:
    """The planner's choice for each Table 2 column (PaLM 540B, 64 x TPU v4), with the paper's
    chips, batch and weight format; objective latency (low latency) or cost (high throughput)."""
    chip = CHIPS["tpu-v4"]
    rows = []
    for col in (c for c in TABLE23_PAPER if c.table == 2):
        e = best_layout(preset(col.model), chip, col.chips, col.phase, col.batch, TABLE23_INPUT_LEN,
                        TABLE23_GEN_LEN, objective=col.objective, weights=col.weights)
        rows.append((col, e))
    return rows


def print_planner_demo(console: Any = None) -> None:
    from rich.table import Table

    from meshlm.cli.plan import console as wide_console

    console = console or wide_console()
    t = Table(title=f"meshlm planner: PaLM 540B on 64 TPU v4 chips (prompt {TABLE23_INPUT_LEN}, "
                    f"{TABLE23_GEN_LEN} generated tokens) vs the paper's Table 2")
    for col in ("setting", "batch", "weights", "FFN", "attention", "mesh", "latency", "per token", "MFU",
                "paper latency", "paper MFU"):
        t.add_column(col)
    for col, e in planner_demo():
        per_token = f"{e.step_latency_s * 1e3:.1f} ms" if col.phase == "decode" else ""
        t.add_row(col.name, str(col.batch), e.weights, e.ffn, e.attention, str(e.layout.mesh),
                  f"{e.latency_s:.3g} s", per_token, f"{e.mfu:.0%}", f"{col.latency_s:g} s", f"{col.mfu:.0%}")
    console.print(t)


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.planner_only:
        import os

        from meshlm.mesh import simulate_cpu_devices

        # the real job runs on simulated CPU devices everywhere (reproducible); set before JAX starts
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        simulate_cpu_devices(args.devices)
    print_planner_demo()
    if not args.planner_only:
        from meshlm.cli.generate import real_model_demo

        real_model_demo(args.devices)
    return 0


def register(sub: Any) -> None:
    from meshlm.cli import positive_int

    p = sub.add_parser("demo", help="the planner on the paper's headline case (PaLM 540B, 64 TPU v4), then "
                                    "SmolLM2 answering on 8 simulated devices with predicted vs measured latency")
    p.add_argument("--devices", type=positive_int, default=8, help="simulated devices for the real job (default 8)")
    p.add_argument("--planner-only", action="store_true", help="only the planner table (no model run)")
    p.set_defaults(func=cmd_demo)
