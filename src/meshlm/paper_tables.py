"""The paper's printed results (Pope et al. 2022: Tables 1-3, Figure 3) beside meshlm's values.

Every meshlm value here is computed by the same code users run: Table 1 from
`comm.kv_cache_bytes_per_device`, Tables 2-3 from `planner.plan`, Figure 3 from
`comm.forward_collectives` (the executor's inventory). `meshlm paper` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshlm import comm
from meshlm.config import ModelConfig, preset
from meshlm.hardware import CHIPS, ChipSpec
from meshlm.layouts import Layout, MeshShape
from meshlm.planner import plan

GiB = 1024**3

# ---- Table 1: max context length, PaLM 540B on 64 chips, 30% of HBM for the KV cache ([P] §4.2)
TABLE1_PAPER = {("multihead", 128): 1320, ("multihead", 512): 330, ("baseline multiquery", 128): 660,
                ("baseline multiquery", 512): 165, ("optimized multiquery", 128): 43_000,
                ("optimized multiquery", 512): 10_700}
TABLE1_KV_FRACTION = 0.3


@dataclass(frozen=True)
class Column:
    """One column of Table 2 or 3: the setting the paper gives, and what it printed."""

    table: int
    name: str
    model: str
    phase: str
    chips: int
    batch: int
    weights: str
    objective: str  # 'latency' for the low-latency columns, 'cost' for high-throughput ones
    ffn: str
    attention: str
    mfu: float
    latency_s: float


# [P] Tables 2 and 3: prefill of 2048 tokens, decode of 64 tokens after a 2048-token context.
TABLE23_INPUT_LEN, TABLE23_GEN_LEN = 2048, 64
TABLE23_PAPER = [
    Column(2, "LL prefill", "palm-540b", "prefill", 64, 1, "int8", "latency", "ws2d", "heads", 0.43, 0.29),
    Column(2, "LL decode", "palm-540b", "decode", 64, 64, "int8", "latency", "ws2d", "batch", 0.14, 1.82),
    Column(2, "HT prefill", "palm-540b", "prefill", 64, 512, "bf16", "cost", "wg-xyz", "batch", 0.76, 85.2),
    Column(2, "HT decode", "palm-540b", "decode", 64, 512, "bf16", "cost", "ws2d", "batch", 0.33, 6.0),
    Column(3, "LL prefill", "palm-62b", "prefill", 16, 1, "int8", "latency", "ws2d", "heads", 0.36, 0.16),
    Column(3, "LL decode", "palm-62b", "decode", 16, 32, "int8", "latency", "ws2d", "batch", 0.08, 0.73),
    Column(3, "HT prefill", "palm-62b", "prefill", 32, 512, "bf16", "cost", "wg-xyz", "batch", 0.73, 20.2),
    Column(3, "HT decode", "palm-62b", "decode", 8, 512, "bf16", "cost", "ws2d", "batch", 0.37, 5.1),
]

# ---- Figure 3: per-chip FFN communication volume (GB) vs tokens per batch, X=Y=Z=4, E=16384, F=65536.
# The figure has no table; these are the App. A formulas in bf16 as paper.md §4.4 lists them.
FIGURE3_MESH = MeshShape(4, 4, 4)
FIGURE3_E, FIGURE3_F = 16384, 65536
FIGURE3_LAYOUTS = ("ws2d", "wg-x", "wg-xy", "wg-xyz")
FIGURE3_PAPER = {2_000: (0.0655, 0.301, 1.08, 4.29), 20_000: (0.655, 0.596, 1.16, 4.29),
                 200_000: (6.55, 3.55, 1.89, 4.29), 2_000_000: (65.5, 33.0, 9.27, 4.29)}
FIGURE3_CROSSOVERS_PAPER = (16_500, 66_000, 790_000)  # ws2d -> wg-x -> wg-xy -> wg-xyz
FIGURE3_BATCH = 16  # sequences; splits over every batch-axis group of the WG layouts, so no padding


def rel_err(mine: float, paper: float) -> float:
    return mine / paper - 1.0


# ---- Table 1 ---------------------------------------------------------------------------------
def table1_variants() -> dict[str, tuple[ModelConfig, str]]:
    """(model, attention layout) per row. The multihead variant has 64 heads of d_head 128 (the
    table's d_head; [P] keeps the attention parameter count about constant)."""
    palm = preset("palm-540b")
    mha = palm.replace(name="palm-540b-multihead", n_heads=64, n_kv_heads=64, d_head=128, mfu_n_heads=None)
    return {"multihead": (mha, "heads"), "baseline multiquery": (palm, "heads"),
            "optimized multiquery": (palm, "batch")}


def max_context(cfg: ModelConfig, attention: str, batch: int, chip: ChipSpec, mesh: MeshShape,
                kv_fraction: float) -> int:
    """Longest context whose KV cache fits in kv_fraction of one chip's memory."""
    layout = Layout("ws2d", attention, "bf16", mesh)
    per_token = comm.kv_cache_bytes_per_device(cfg, layout, batch, 1, kv_bytes=2)
    return int(kv_fraction * chip.hbm_bytes // per_token)


def table1() -> list[dict[str, Any]]:
    chip, mesh = CHIPS["tpu-v4"], FIGURE3_MESH
    rows = []
    for (variant, batch), paper in TABLE1_PAPER.items():
        cfg, attention = table1_variants()[variant]
        mine = max_context(cfg, attention, batch, chip, mesh, TABLE1_KV_FRACTION)
        rows.append({"variant": variant, "batch": batch, "paper": paper, "meshlm": mine,
                     "rel_err": rel_err(mine, paper)})
    return rows


# ---- Tables 2 and 3 ---------------------------------------------------------------------------
def table23() -> list[dict[str, Any]]:
    chip = CHIPS["tpu-v4"]
    rows = []
    for col in TABLE23_PAPER:
        res = plan(preset(col.model), chip, col.chips, col.phase, col.batch, TABLE23_INPUT_LEN, TABLE23_GEN_LEN,
                   objective=col.objective, weights=col.weights)
        c = res.choice
        rows.append({"table": col.table, "column": col.name, "model": col.model, "chips": col.chips,
                     "batch": col.batch, "weights": col.weights, "objective": col.objective,
                     "paper_ffn": col.ffn, "paper_attention": col.attention,
                     "ffn": c.ffn if c else None, "attention": c.attention if c else None,
                     "mesh": c.mesh if c else None,
                     "layout_match": bool(c and (c.ffn, c.attention) == (col.ffn, col.attention)),
                     "paper_latency_s": col.latency_s, "latency_s": c.latency_s if c else None,
                     "latency_rel_err": rel_err(c.latency_s, col.latency_s) if c else None,
                     "paper_mfu": col.mfu, "mfu": c.mfu if c else None,
                     "mfu_rel_err": rel_err(c.mfu, col.mfu) if c else None})
    return rows


# ---- Figure 3 --------------------------------------------------------------------------------------
def figure3_model() -> ModelConfig:
    """A plain (2-matrix) MLP with Figure 3's E and F; a serial block keeps the FFN's collectives
    labelled 'ffn.*' in the inventory."""
    return ModelConfig(name="figure3", n_layers=1, d_model=FIGURE3_E, d_ff=FIGURE3_F, n_heads=64, n_kv_heads=64,
                       d_head=256, vocab=64, block="serial", gated_mlp=False)


def ffn_volume_bytes(ffn: str, tokens: int) -> float:
    """Per-chip bytes of one FFN layer's collectives (meshlm.comm), `tokens` = B*L."""
    if tokens % FIGURE3_BATCH:
        raise ValueError(f"tokens must be a multiple of {FIGURE3_BATCH}")
    layout = Layout(ffn, "heads", "bf16", FIGURE3_MESH)
    cs = comm.forward_collectives(figure3_model(), layout, "prefill", FIGURE3_BATCH, tokens // FIGURE3_BATCH, 0)
    return sum(c.bytes * c.count for c in cs if c.what.startswith("ffn"))


def min_volume_layout(tokens: int) -> str:
    return min(FIGURE3_LAYOUTS, key=lambda f: ffn_volume_bytes(f, tokens))


def figure3_crossovers(lo: int = 1_024, hi: int = 16_777_216) -> list[tuple[str, str, int]]:
    """Token counts where the minimum-volume layout changes (bisection on multiples of the batch)."""
    out = []
    a = lo
    while a < hi:
        la = min_volume_layout(a)
        b = hi
        if min_volume_layout(b) == la:
            break
        while b - a > FIGURE3_BATCH:  # invariant: min at a is la, min at b differs
            mid = (a + b) // 2 // FIGURE3_BATCH * FIGURE3_BATCH
            if min_volume_layout(mid) == la:
                a = mid
            else:
                b = mid
        out.append((la, min_volume_layout(b), b))
        a = b
    return out


def figure3() -> dict[str, Any]:
    rows = []
    for tokens, paper in FIGURE3_PAPER.items():
        mine = [ffn_volume_bytes(f, tokens) / 1e9 for f in FIGURE3_LAYOUTS]
        rows.append({"tokens": tokens, "paper_gb": dict(zip(FIGURE3_LAYOUTS, paper)),
                     "meshlm_gb": dict(zip(FIGURE3_LAYOUTS, mine)),
                     "rel_err": {f: rel_err(m, p) for f, m, p in zip(FIGURE3_LAYOUTS, mine, paper)}})
    cross = [{"from": a, "to": b, "tokens": t, "paper_tokens": p, "rel_err": rel_err(t, p)}
             for (a, b, t), p in zip(figure3_crossovers(), FIGURE3_CROSSOVERS_PAPER)]
    return {"volumes": rows, "crossovers": cross}


def all_tables() -> dict[str, Any]:
    return {"table1": table1(), "tables2_3": table23(), "figure3": figure3()}
