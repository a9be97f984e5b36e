"""Layout planner: enumerate mesh shapes x FFN layout x attention layout x weight format, price
each with `meshlm.costmodel`, drop what does not fit in memory, rank by an objective.

Objectives: 'latency' (lowest phase latency) and 'cost' (lowest chip-ms per token, i.e. highest
MFU); `max_latency` turns either into "best under a latency limit". Differences smaller than
TIE_TOL (relative) are below the model's resolution: such ties go to the layout whose weights use
the shared 2D storage E_x F_yz (so prefill and decode can switch layouts without moving weights,
[P] §3.2.3), then to the one with less memory per chip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from meshlm.config import ModelConfig
from meshlm.costmodel import Estimate, collective_breakdown, estimate
from meshlm.errors import MeshlmError
from meshlm.hardware import ChipSpec
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, FFN_PLANS, PHASES, WEIGHT_FORMATS, Layout, MeshShape

OBJECTIVES = ("latency", "cost")
DEFAULT_WEIGHTS = ("bf16", "int8")  # f32 only when asked for: it never wins on an accelerator
TIE_TOL = 1e-3
# FFN layouts whose weights live in the one storage E_x F_yz that serves both phases ([P] §3.2.3,
# DESIGN.md "stored once"). ws1d needs its own storage E F_xyz; it is priced when asked for
# (--ffn ws1d), and on a mesh with X = 1 ws2d is the same dataflow.
SHARED_STORAGE_FFN = tuple(f for f in FFN_LAYOUTS if FFN_PLANS[f].storage == "E_x F_yz")


@dataclass
class PlanResult:
    model: str
    chip: str
    phase: str
    n_chips: int
    batch: int | list[int]
    input_len: int
    gen_len: int
    objective: str
    max_latency: float | None
    choice: Estimate | None  # None when nothing fits (or nothing meets max_latency)
    candidates: list[Estimate] = field(default_factory=list)  # ranked, fitting ones first
    collectives: list[dict[str, Any]] = field(default_factory=list)  # the choice's, per collective

    def to_dict(self) -> dict[str, Any]:
        choice = None
        if self.choice:
            choice = self.choice.to_dict() | {"collectives": self.collectives}
        return {"model": self.model, "hardware": self.chip, "phase": self.phase, "n_chips": self.n_chips,
                "batch": self.batch, "input_len": self.input_len, "gen_len": self.gen_len,
                "objective": self.objective, "max_latency": self.max_latency, "choice": choice,
                "candidates": [e.to_dict() for e in self.candidates]}


def meshes_for(chip: ChipSpec, n_chips: int, mesh: MeshShape | None = None) -> list[MeshShape]:
    """The mesh shapes to try (one forced mesh, or the chip's candidates for n_chips)."""
    if n_chips < 1:
        raise MeshlmError(f"number of chips must be >= 1, got {n_chips}")
    if mesh is not None:
        if mesh.n != n_chips:
            raise MeshlmError(f"mesh {mesh} has {mesh.n} chips, not {n_chips}")
        return [mesh]
    shapes = chip.mesh_shapes(n_chips)
    if not shapes:
        raise MeshlmError(f"{n_chips} chips cannot form a {chip.topology} slice of {chip.name} "
                          "(pass --mesh XxYxZ to use a logical mesh anyway)")
    return shapes


def candidate_layouts(chip: ChipSpec, n_chips: int, ffn: str | None = None, attention: str | None = None,
                      weights: str | None = None, mesh: MeshShape | None = None,
                      kv_cache: str | None = None) -> list[Layout]:
    """Every layout the planner evaluates; each forced option restricts one dimension (kv_cache,
    the KV format, is carried by every candidate: None caches in the activation dtype)."""
    for what, v, known in (("FFN layout", ffn, FFN_LAYOUTS), ("attention layout", attention, ATTN_LAYOUTS),
                           ("weight format", weights, WEIGHT_FORMATS)):
        if v is not None and v not in known:
            raise MeshlmError(f"unknown {what} {v!r}; known: {', '.join(known)}")
    ffns = [ffn] if ffn else list(SHARED_STORAGE_FFN)
    attns = [attention] if attention else list(ATTN_LAYOUTS)
    fmts = [weights] if weights else list(DEFAULT_WEIGHTS)
    return [Layout(f, a, w, m, kv_cache=kv_cache)
            for m in meshes_for(chip, n_chips, mesh) for f in ffns for a in attns for w in fmts]


def objective_value(e: Estimate, objective: str) -> float:
    return e.latency_s if objective == "latency" else e.cost_chip_ms_per_token


def _prefers(e: Estimate) -> tuple[int, float]:
    """Tie-break: shared 2D weight storage first, then less memory per chip."""
    return (0 if FFN_PLANS[e.ffn].storage == "E_x F_yz" else 1, e.memory_per_chip_bytes)


def rank(estimates: Iterable[Estimate], objective: str, max_latency: float | None = None) -> list[Estimate]:
    """Fitting candidates that meet max_latency by objective (ties per module docstring), then
    the rest by objective."""
    if objective not in OBJECTIVES:
        raise MeshlmError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    est = list(estimates)

    def ok(e: Estimate) -> bool:
        return e.fits and (max_latency is None or e.latency_s <= max_latency)

    good = sorted((e for e in est if ok(e)), key=lambda e: objective_value(e, objective))
    rest = sorted((e for e in est if not ok(e)), key=lambda e: objective_value(e, objective))
    if good:  # move the preferred one among near-ties to the front
        best = objective_value(good[0], objective)
        tied = [e for e in good if objective_value(e, objective) <= best * (1 + TIE_TOL)]
        head = min(tied, key=_prefers)
        good.remove(head)
        good.insert(0, head)
    return good + rest


def plan(cfg: ModelConfig, chip: ChipSpec, n_chips: int, phase: str, batch: int | Sequence[int], input_len: int,
         gen_len: int, objective: str = "latency", max_latency: float | None = None, ffn: str | None = None,
         attention: str | None = None, weights: str | None = None, mesh: MeshShape | None = None,
         kv_cache: str | None = None) -> PlanResult:
    """Price every candidate layout for one phase and rank them (see module docstring). A list of
    batches adds batch to the enumeration (useful with objective 'cost' and max_latency)."""
    if phase not in PHASES:
        raise MeshlmError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    if objective not in OBJECTIVES:
        raise MeshlmError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if max_latency is not None and not max_latency > 0:
        raise MeshlmError(f"max latency must be > 0 seconds, got {max_latency}")
    batches = [batch] if isinstance(batch, int) else list(batch)
    if not batches:
        raise MeshlmError("give at least one batch size")
    layouts = candidate_layouts(chip, n_chips, ffn, attention, weights, mesh, kv_cache)
    ranked = rank((estimate(cfg, chip, lay, phase, b, input_len, gen_len) for lay in layouts for b in batches),
                  objective, max_latency)
    choice = ranked[0] if ranked and ranked[0].fits and (
        max_latency is None or ranked[0].latency_s <= max_latency) else None
    colls = collective_breakdown(cfg, chip, choice.layout, phase, choice.batch, input_len, gen_len) if choice else []
    return PlanResult(model=cfg.name, chip=chip.name, phase=phase, n_chips=n_chips,
                      batch=batch if isinstance(batch, int) else batches, input_len=input_len, gen_len=gen_len,
                      objective=objective, max_latency=max_latency, choice=choice, candidates=ranked,
                      collectives=colls)


def no_choice_reason(res: PlanResult, chip: ChipSpec) -> str:
    """One line saying why a plan has no choice."""
    if any(e.fits for e in res.candidates):
        fastest = min(e.latency_s for e in res.candidates if e.fits)
        return (f"no layout meets the latency limit {res.max_latency:g} s (the fastest that fits takes "
                f"{fastest:.3g} s)")
    least = min((e.memory_per_chip_bytes for e in res.candidates), default=0.0)
    return (f"no layout of {res.model} fits on {res.n_chips} x {chip.name} for {res.phase} at batch {res.batch}: "
            f"the smallest needs {least / 2**30:.1f} GiB per chip, the chip has {chip.hbm_bytes / 2**30:.1f} GiB")


def best_layout(cfg: ModelConfig, chip: ChipSpec, n_chips: int, phase: str, batch: int, input_len: int,
                gen_len: int, objective: str = "latency", **restrict: Any) -> Estimate:
    """The chosen layout's estimate; MeshlmError when no layout fits."""
    res = plan(cfg, chip, n_chips, phase, batch, input_len, gen_len, objective, **restrict)
    if res.choice is None:
        raise MeshlmError(no_choice_reason(res, chip))
    return res.choice
