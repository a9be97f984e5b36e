"""Latency vs cost Pareto frontier over chips x batch x layouts (the paper's Figure 1).

Latency is the per-step latency for decode (ms per generated token, Figure 1 left) and the
whole prefill for prefill (Figure 1 right); cost is chip-ms per token. A point is on the frontier
when no other point is both faster and cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from meshlm.config import ModelConfig
from meshlm.costmodel import Estimate, estimate
from meshlm.errors import MeshlmError
from meshlm.hardware import ChipSpec
from meshlm.planner import candidate_layouts

DEFAULT_CHIPS = (8, 16, 32, 64, 128, 256)
DEFAULT_BATCHES = tuple(2**i for i in range(11))  # 1 .. 1024


def point_latency(e: Estimate) -> float:
    return e.step_latency_s if e.phase == "decode" else e.latency_s


@dataclass
class Frontier:
    model: str
    chip: str
    phase: str
    points: list[Estimate]  # every fitting candidate evaluated
    frontier: list[Estimate]  # by increasing latency, decreasing cost

    def to_dict(self) -> dict[str, Any]:
        def row(e: Estimate) -> dict[str, Any]:
            return {"n_chips": e.layout.mesh.n, "batch": e.batch, "ffn": e.ffn, "attention": e.attention,
                    "weights": e.weights, "mesh": e.mesh, "latency_s": e.latency_s,
                    "step_latency_s": e.step_latency_s, "cost_chip_ms_per_token": e.cost_chip_ms_per_token,
                    "mfu": e.mfu}

        return {"model": self.model, "hardware": self.chip, "phase": self.phase,
                "latency_axis": "step_latency_s" if self.phase == "decode" else "latency_s",
                "n_points": len(self.points), "frontier": [row(e) for e in self.frontier]}


def frontier_of(points: Iterable[Estimate]) -> list[Estimate]:
    """Points not dominated in (latency, cost), sorted by latency."""
    out: list[Estimate] = []
    best_cost = float("inf")
    for e in sorted(points, key=lambda e: (point_latency(e), e.cost_chip_ms_per_token)):
        if e.cost_chip_ms_per_token < best_cost:
            out.append(e)
            best_cost = e.cost_chip_ms_per_token
    return out


def sweep(cfg: ModelConfig, chip: ChipSpec, phase: str, chips: Iterable[int] = DEFAULT_CHIPS,
          batches: Iterable[int] = DEFAULT_BATCHES, input_len: int = 2048, gen_len: int = 64,
          weights: str | None = None, ffn: str | None = None, attention: str | None = None,
          kv_cache: str | None = None) -> Frontier:
    """Every fitting (chips, batch, layout) point and their frontier."""
    points = []
    batches = list(batches)
    for n in chips:
        if not chip.mesh_shapes(n):
            continue
        for lay in candidate_layouts(chip, n, ffn=ffn, attention=attention, weights=weights, kv_cache=kv_cache):
            for b in batches:
                e = estimate(cfg, chip, lay, phase, b, input_len, gen_len)
                if e.fits:
                    points.append(e)
    if not points:
        raise MeshlmError(f"no configuration of {cfg.name} fits on {chip.name} for {phase}")
    return Frontier(cfg.name, chip.name, phase, points, frontier_of(points))


def plot(fr: Frontier, path: str | Path) -> None:
    """Scatter of every point (grey) and the frontier (labelled chips/batch), log-log, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (1e3, "ms per token") if fr.phase == "decode" else (1.0, "s")
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([point_latency(e) * scale for e in fr.points], [e.cost_chip_ms_per_token for e in fr.points],
               s=6, c="0.75", label="all layouts")
    xs = [point_latency(e) * scale for e in fr.frontier]
    ys = [e.cost_chip_ms_per_token for e in fr.frontier]
    ax.plot(xs, ys, "o-", color="tab:blue", label="Pareto frontier")
    for e, x, y in zip(fr.frontier, xs, ys):
        ax.annotate(f"C:{e.layout.mesh.n} B:{e.batch} {e.weights}", (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{fr.phase} latency ({unit})")
    ax.set_ylabel("cost (chip-ms per token)")
    ax.set_title(f"{fr.model} on {fr.chip}: {fr.phase}")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise MeshlmError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
