"""`meshlm plan`, `meshlm pareto`, `meshlm paper`: the analytical planner on the command line.

Numbers and names are parsed here (not by argparse) so that every bad value ends in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshlm.config import load_model_config
from meshlm.costmodel import Estimate
from meshlm.errors import MeshlmError
from meshlm.hardware import load_chip
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, KV_FORMATS, PHASES, WEIGHT_FORMATS, MeshShape
from meshlm.planner import OBJECTIVES, no_choice_reason, plan

GiB = 1024**3


def console() -> Any:
    """A rich console wide enough for the tables even when stdout is a pipe."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal and c.width >= 140 else Console(width=160)


# ---- argument parsing helpers ----------------------------------------------------------------
def _positive(text: str | None, what: str, kind, noun: str):
    if text is None:
        return None
    try:
        v = kind(text)
    except ValueError:
        raise MeshlmError(f"{what} must be a positive {noun}, got {text!r}") from None
    if not v > 0:
        raise MeshlmError(f"{what} must be a positive {noun}, got {text}")
    return v


def pos_int(text: str | None, what: str) -> int | None:
    return _positive(text, what, int, "integer")


def pos_float(text: str | None, what: str) -> float | None:
    return _positive(text, what, float, "number")


def int_csv(text: str, what: str) -> list[int]:
    vals = [pos_int(t.strip(), what) for t in text.split(",") if t.strip()]
    if not vals:
        raise MeshlmError(f"{what} must list at least one positive integer")
    return [v for v in vals if v is not None]


def choice(text: str | None, known: tuple[str, ...], what: str) -> str | None:
    if text is not None and text not in known:
        raise MeshlmError(f"unknown {what} {text!r}; known: {', '.join(known)}")
    return text


def add_workload_args(p: argparse.ArgumentParser, phase_required: bool = True) -> None:
    p.add_argument("--model", default="palm-540b", help="preset name or path to a Hugging Face config.json")
    p.add_argument("--hardware", default="tpu-v4", help="chip preset (tpu-v4, h100-sxm, ...) or a JSON spec")
    p.add_argument("--phase", required=phase_required, help=f"one of {', '.join(PHASES)}")
    p.add_argument("--input-len", default="2048", help="prompt tokens per sequence (default 2048)")
    p.add_argument("--gen-len", default="64", help="generated tokens per sequence (default 64)")
    p.add_argument("--weights", help=f"force a weight format: {', '.join(WEIGHT_FORMATS)}")
    p.add_argument("--kv-cache", help=f"the KV cache's format: {', '.join(KV_FORMATS)} (default: the chip's "
                                      "activation dtype, bf16 on accelerators)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


# ---- plan ----------------------------------------------------------------------------------------
def fmt_s(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3g} s"


def candidates_table(res: Any, top: int) -> Any:
    from rich.table import Table

    t = Table(title=f"{res.model} on {res.n_chips} x {res.chip}, {res.phase}, batch {res.batch} "
                    f"(objective: {res.objective})")
    for col in ("#", "batch", "ffn", "attention", "weights", "mesh", "latency", "per step", "MFU", "chip-ms/token",
                "GiB/chip", "fits"):
        t.add_column(col, justify="right" if col not in ("ffn", "attention", "weights") else "left")
    for i, e in enumerate(res.candidates[:top], 1):
        t.add_row(str(i), str(e.batch), e.ffn, e.attention, e.weights, str(e.layout.mesh), fmt_s(e.latency_s),
                  fmt_s(e.step_latency_s), f"{e.mfu:.1%}", f"{e.cost_chip_ms_per_token:.3g}",
                  f"{e.memory_per_chip_bytes / GiB:.1f}", "yes" if e.fits else "no")
    return t


def breakdown_lines(e: Estimate) -> list[str]:
    b, m = e.breakdown, e.memory
    return [
        f"choice: ffn {e.ffn}, attention {e.attention}, weights {e.weights}, mesh {e.layout.mesh}"
        + (f", KV cache {e.layout.kv_cache}" if e.layout.kv_cache else ""),
        f"  latency {fmt_s(e.latency_s)} (per step {fmt_s(e.step_latency_s)}), MFU {e.mfu:.1%}, "
        f"cost {e.cost_chip_ms_per_token:.3g} chip-ms/token",
        f"  compute {fmt_s(b['compute'])} (matmul {fmt_s(b['matmul'])}, attention {fmt_s(b['attention'])}); "
        f"memory {fmt_s(b['memory'])} (weights {fmt_s(b['weight_load'])}, KV {fmt_s(b['kv_load'])}); "
        f"communication {fmt_s(b['communication'])} (bandwidth {fmt_s(b['comm_bandwidth'])}, "
        f"latency {fmt_s(b['comm_latency'])})",
        f"  memory per chip {e.memory_per_chip_bytes / GiB:.2f} GiB = weights {m['weights'] / GiB:.2f} + "
        f"KV cache {m['kv_cache'] / GiB:.2f} + working set {m['working_set'] / GiB:.2f}",
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_model_config(args.model)
    chip = load_chip(args.hardware)
    phase = choice(args.phase, PHASES, "phase")
    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    chips = pos_int(args.chips, "--chips")
    if chips is None:
        if mesh is None:
            raise MeshlmError("give --chips N (or --mesh XxYxZ)")
        chips = mesh.n
    if mesh is not None and mesh.n != chips:
        raise MeshlmError(f"mesh {mesh} has {mesh.n} chips, not --chips {chips}")
    batches = int_csv(args.batch, "--batch")
    batch = batches[0] if len(batches) == 1 else batches
    input_len = pos_int(args.input_len, "--input-len")
    gen_len = pos_int(args.gen_len, "--gen-len")
    max_latency = pos_float(args.max_latency, "--max-latency")
    objective = choice(args.objective, OBJECTIVES, "objective") or ("cost" if max_latency else "latency")
    res = plan(cfg, chip, chips, phase, batch, input_len, gen_len, objective=objective, max_latency=max_latency,
               ffn=choice(args.ffn, FFN_LAYOUTS, "FFN layout"),
               attention=choice(args.attention, ATTN_LAYOUTS, "attention layout"),
               weights=choice(args.weights, WEIGHT_FORMATS, "weight format"), mesh=mesh,
               kv_cache=choice(args.kv_cache, KV_FORMATS, "KV cache format"))
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0 if res.choice else 1
    out = console()
    out.print(candidates_table(res, pos_int(args.top, "--top")))
    if res.choice is None:
        print(f"meshlm plan: {no_choice_reason(res, chip)}", file=sys.stderr)
        return 1
    for line in breakdown_lines(res.choice):
        out.print(line, highlight=False)
    out.print(collectives_table(res.collectives))
    return 0


def collectives_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="collectives of the choice over the phase (meshlm.comm)")
    for col in ("what", "kind", "axes", "MB each", "count", "time", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["what"], r["kind"], r["axes"], f"{r['bytes'] / 1e6:.3g}", str(r["count"]), fmt_s(r["seconds"]),
                  "prefetched under matmuls" if r["prefetched"] else "")
    return t


# ---- pareto ----------------------------------------------------------------------------------------
def cmd_pareto(args: argparse.Namespace) -> int:
    from meshlm.pareto import plot, sweep

    cfg = load_model_config(args.model)
    chip = load_chip(args.hardware)
    phase = choice(args.phase, PHASES, "phase")
    fr = sweep(cfg, chip, phase, chips=int_csv(args.chips, "--chips"), batches=int_csv(args.batches, "--batches"),
               input_len=pos_int(args.input_len, "--input-len"), gen_len=pos_int(args.gen_len, "--gen-len"),
               weights=choice(args.weights, WEIGHT_FORMATS, "weight format"),
               kv_cache=choice(args.kv_cache, KV_FORMATS, "KV cache format"))
    if args.out:
        plot(fr, args.out)
    if args.json:
        d = fr.to_dict()
        d["plot"] = args.out
        print(json.dumps(d))
        return 0
    from rich.table import Table

    scale, unit = (1e3, "ms/token") if phase == "decode" else (1.0, "s")
    t = Table(title=f"Pareto frontier: {cfg.name} on {chip.name}, {phase} ({len(fr.points)} points)")
    for col in ("chips", "batch", "ffn", "attention", "weights", "mesh", f"latency ({unit})", "chip-ms/token",
                "MFU"):
        t.add_column(col)
    for e in fr.frontier:
        lat = e.step_latency_s if phase == "decode" else e.latency_s
        t.add_row(str(e.layout.mesh.n), str(e.batch), e.ffn, e.attention, e.weights, str(e.layout.mesh),
                  f"{lat * scale:.3g}", f"{e.cost_chip_ms_per_token:.3g}", f"{e.mfu:.1%}")
    console().print(t)
    if args.out:
        print(f"plot written to {args.out}")
    return 0


# ---- paper -------------------------------------------------------------------------------------------
def cmd_paper(args: argparse.Namespace) -> int:
    from meshlm import paper_tables as pt

    data = pt.all_tables()
    if args.json:
        print(json.dumps(data))
        return 0
    from rich.table import Table

    out = console()
    t1 = Table(title="Table 1: max context, PaLM 540B on 64 TPU v4, 30% of HBM for the KV cache")
    for col in ("variant", "batch", "paper", "meshlm", "rel. error"):
        t1.add_column(col)
    for r in data["table1"]:
        t1.add_row(r["variant"], str(r["batch"]), f"{r['paper']:,}", f"{r['meshlm']:,}", f"{r['rel_err']:+.1%}")
    out.print(t1)
    t2 = Table(title="Tables 2 and 3: planner choice vs the paper (prefill 2048 tokens, decode 64 after 2048)")
    for col in ("table", "column", "chips", "batch", "weights", "paper layout", "meshlm layout", "mesh",
                "latency paper", "latency meshlm", "err", "MFU paper", "MFU meshlm", "err"):
        t2.add_column(col)
    for r in data["tables2_3"]:
        t2.add_row(str(r["table"]), r["column"], str(r["chips"]), str(r["batch"]), r["weights"],
                   f"{r['paper_ffn']}/{r['paper_attention']}", f"{r['ffn']}/{r['attention']}",
                   "x".join(map(str, r["mesh"] or [])), f"{r['paper_latency_s']:g} s", f"{r['latency_s']:.3g} s",
                   f"{r['latency_rel_err']:+.1%}", f"{r['paper_mfu']:.0%}", f"{r['mfu']:.1%}",
                   f"{r['mfu_rel_err']:+.1%}")
    out.print(t2)
    t3 = Table(title="Figure 3: per-chip FFN communication volume (GB), X=Y=Z=4, E=16384, F=65536")
    t3.add_column("tokens")
    for f in pt.FIGURE3_LAYOUTS:
        t3.add_column(f"{f} paper")
        t3.add_column(f"{f} meshlm (err)")
    for r in data["figure3"]["volumes"]:
        cells = []
        for f in pt.FIGURE3_LAYOUTS:
            cells += [f"{r['paper_gb'][f]:.3g}", f"{r['meshlm_gb'][f]:.4g} ({r['rel_err'][f]:+.2%})"]
        t3.add_row(f"{r['tokens']:,}", *cells)
    out.print(t3)
    for c in data["figure3"]["crossovers"]:
        out.print(f"min-volume layout {c['from']} -> {c['to']} at {c['tokens']:,} tokens "
                      f"(paper ~{c['paper_tokens']:,}, {c['rel_err']:+.1%})", highlight=False)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="rank partitioning layouts for one phase with the cost model",
                       description="Rank layouts (mesh x FFN x attention x weights) by the analytical cost model.")
    add_workload_args(p)
    p.add_argument("--chips", help="number of chips")
    p.add_argument("--batch", default="1", help="batch size in sequences (default 1); a list 1,8,64 adds batch "
                                                "to the enumeration")
    p.add_argument("--ffn", help=f"force the FFN layout: {', '.join(FFN_LAYOUTS)}")
    p.add_argument("--attention", help=f"force the attention layout: {', '.join(ATTN_LAYOUTS)}")
    p.add_argument("--mesh", help="force the mesh shape XxYxZ, e.g. 4x4x4")
    p.add_argument("--objective", help="latency (default) or cost (highest MFU)")
    p.add_argument("--max-latency", help="seconds: the cheapest layout within this phase latency")
    p.add_argument("--top", default="10", help="rows of the candidate table (default 10)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pareto", help="latency vs cost Pareto frontier over chips x batch x layouts",
                       description="The paper's Figure 1 for any model and chip: JSON and/or a PNG plot.")
    add_workload_args(p)
    p.add_argument("--chips", default="8,16,32,64,128,256", help="comma-separated chip counts")
    p.add_argument("--batches", default=",".join(str(2**i) for i in range(11)), help="comma-separated batches")
    p.add_argument("--out", help="write the plot to this PNG file")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("paper", help="the paper's Tables 1-3 and Figure 3 beside meshlm's values")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_paper)
