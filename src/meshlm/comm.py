"""Every collective one forward pass runs, per layout: the single description shared by the cost
model (which prices it) and the sharded executor (whose compiled HLO must move exactly these bytes).

Pure Python, no JAX. Letters as in `meshlm.model`: B batch, L query length, E d_model, F d_ff,
H query heads, K KV heads, D head dim, V vocab; mesh axes x, y, z. docs/layouts.md draws each
layout's dataflow; this module is its byte-exact inventory.

Conventions the executor follows (and this module therefore counts):
- The batch is padded up to `batch_multiple(layout)` (B must split over the layout's batch axes,
  and over all n devices for batch-sharded attention): padded rows are computed and moved.
- Heads are padded per KV group so they split over the mesh (`served_heads`); the KV projection is
  stored expanded to `kv_slots` = max(K_s, n) slots (slot j holds KV head j // (slots / K_s)), so
  it shards like the query heads; padded heads have zero weights and contribute exactly zero.
- The vocab is padded to a multiple of n (`served_vocab`); embedding and output projection are
  V-sharded over all axes. The embedding ends in a reduce-scatter(xyz) onto the residual layout,
  the final hidden state is all-gathered over xyz, the logits (f32) are all-gathered over xyz.
- A collective over a group of size 1 does not exist (neither here nor in the program).
- Norm statistics when E is split (ws2d: E_x after the all-gather): one f32 all-reduce over the
  E axes per normed tensor of the per-token sums (1 value for RMSNorm, 2 for LayerNorm); with
  collective matmul the norm runs before the gather, so the all-reduce spans all of E's axes.
- Parallel block: attention and FFN input projections are one fused matrix, output projections
  another, so a layer has one reduce-scatter per axis group where the serial block has two.
- Collective matmul (layout.collective_matmul): the activation all-gather before the input matmul
  and the reduce-scatter after the output matmul become (k-1) collective-permutes of 1/k of the
  buffer each, k the group size (§3.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshlm.layouts import Layout, MeshShape, parse_spec

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
STAT_BYTES = 4  # norm statistics are reduced in f32
LOGIT_BYTES = 4  # logits are f32


@dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVE_KINDS
    axes: str  # mesh axes it runs over, e.g. "yz"
    bytes: float  # per device, per occurrence (AG: output; RS: input; others: the buffer)
    count: int  # occurrences per forward pass
    what: str  # label, e.g. "ffn.act_gather"


def _round_up(a: int, m: int) -> int:
    return -(-a // m) * m


def live_axes(axes: str, mesh: MeshShape) -> str:
    """The axes of a group that have more than one device (size-1 axes move nothing)."""
    return "".join(a for a in axes if mesh.size(a) > 1)


# ---- served (padded) sizes -------------------------------------------------------------------------
def served_heads(cfg, mesh: MeshShape) -> tuple[int, int]:
    """(H_s, K_s): query and KV heads as laid out on this mesh.

    K_s is the smallest count >= K that divides n or is a multiple of it (minimising H_s); each
    KV group is padded to G_s query heads so that every device holds whole heads of one group."""
    n, H, K = mesh.n, cfg.n_heads, cfg.n_kv_heads
    G = H // K
    best = None
    for Ks in range(K, _round_up(K, n) + 1):
        if Ks % n == 0:
            Gs = G
        elif n % Ks == 0:
            r = n // Ks
            Gs = _round_up(G, r)
        else:
            continue
        if best is None or Ks * Gs < best[0] * best[1]:
            best = (Ks, Gs)
    Ks, Gs = best
    return Ks * Gs, Ks


def kv_slots(cfg, mesh: MeshShape) -> int:
    """KV heads as stored in the projection and the heads-layout cache: max(K_s, n)."""
    return max(served_heads(cfg, mesh)[1], mesh.n)


def served_vocab(cfg, mesh: MeshShape) -> int:
    return _round_up(cfg.vocab, mesh.n)


def batch_multiple(layout: Layout) -> int:
    """The batch is padded to a multiple of this (see module docstring)."""
    m = layout.mesh.size(layout.plan.batch_axes)
    return math.lcm(m, layout.mesh.n) if layout.attention == "batch" else m


def padded_batch(batch: int, layout: Layout) -> int:
    return _round_up(batch, batch_multiple(layout))


def proj_head_axes(layout: Layout) -> str:
    """Axes F (and the heads) are split over after the input matmul and its reduce-scatter, major
    first. Stored F is split z-major ('zy'), so that gathering y leaves F_z contiguous."""
    p = layout.plan
    return "zyx" if layout.ffn in ("ws1d", "ws2d") else p.f_axes[::-1]


def attention_axes(layout: Layout) -> tuple[str, str]:
    """(batch axes, head axes) of the attention computation and of the KV cache."""
    if layout.attention == "batch":
        return "xyz", ""
    return layout.plan.batch_axes, proj_head_axes(layout)


# ---- the inventory -----------------------------------------------------------------------------------
def _units(cfg, mesh: MeshShape) -> list[tuple[str, int, int, bool]]:
    """Per layer: (name, C_in, C_mid, has_attention). C_in: columns of the fused input matrix; C_mid:
    rows of the fused output matrix."""
    Hs, _ = served_heads(cfg, mesh)
    Kx, D, F = kv_slots(cfg, mesh), cfg.d_head, cfg.d_ff
    ffn_in = (2 if cfg.gated_mlp else 1) * F
    attn_in = (Hs + 2 * Kx) * D
    if cfg.block == "parallel":
        return [("block", ffn_in + attn_in, F + Hs * D, True)]
    return [("attn", attn_in, Hs * D, True), ("ffn", ffn_in, F, False)]


def forward_collectives(cfg, layout: Layout, phase: str, batch: int, q_len: int, kv_len: int,
                        act_bytes: int = 2, all_logits: bool = False) -> list[Collective]:
    """Every collective of one forward pass (see the contract in the module docstring).

    all_logits: prefill returns the logits of every position (test mode) instead of only the last
    prompt position; decode always returns one position. kv_len does not enter: cache reads are
    local in every layout."""
    m, p = layout.mesh, layout.plan
    Y, E, D = cfg.n_layers, cfg.d_model, cfg.d_head
    B = padded_batch(batch, layout)
    L = q_len
    Hs, Ks = served_heads(cfg, m)
    Kx = kv_slots(cfg, m)
    w = layout.bytes_per_weight
    a = act_bytes
    Bl = B // m.size(p.batch_axes)
    ea = live_axes(p.e_axes, m)
    ag = live_axes(p.act_gather, m)
    wg = live_axes(p.weight_gather, m)
    fa_size = m.size(proj_head_axes(layout))  # F split after the input matmul (+ RS over E axes)
    st_size = m.size(p.f_axes)  # F split in the (gathered) weights
    e_size = m.size(p.e_axes)
    nstat = 1 if cfg.norm == "rmsnorm" else 2
    resid_e = dict(parse_spec(p.resid))["E"]
    # int8: the f32 scales travel inside each weight all-gather as 4 extra int8 rows per gathered
    # block (replicated copies included: nx over x for W_in, nc over the F axes for W_out)
    s_rows = 4 if layout.weights == "int8" else 0
    nx = m.size(live_axes("x", m) if "x" in wg else "")
    nc = m.size("".join(a for a in wg if a != "x"))
    out: list[Collective] = []

    def add(kind, axes, nbytes, count, what):
        if axes:
            out.append(Collective(kind, axes, float(nbytes), count, what))

    def gather_or_loop(kind, axes, nbytes, what):
        if layout.collective_matmul and axes:
            k = m.size(axes)
            add("collective-permute", axes, nbytes / k, Y * (k - 1), what + ".loop")
        else:
            add(kind, axes, nbytes, Y, what)

    for name, c_in, c_mid, has_attn in _units(cfg, m):
        gather_or_loop("all-gather", ag, Bl * L * E / e_size * a, f"{name}.act_gather")
        # one normed tensor per unit (the parallel block's two norms share the statistics of x)
        # collective matmul normalises before gathering: the statistics span all of E's axes
        stat_axes = live_axes(resid_e, m) if (layout.collective_matmul and ag) else ea
        add("all-reduce", stat_axes, Bl * L * nstat * STAT_BYTES, Y, f"{name}.norm_stats")
        add("all-gather", wg, (E / e_size + s_rows * nx) * c_in / st_size * w, Y, f"{name}.w_in.gather")
        add("reduce-scatter", ea, Bl * L * c_in / st_size * a, Y, f"{name}.in.reduce_scatter")
        if has_attn and layout.attention == "batch":
            ha = live_axes(proj_head_axes(layout), m)
            add("all-to-all", ha, Bl * L * (Hs + 2 * Kx) * D / fa_size * a, Y, "attn.qkv.all_to_all")
            add("all-to-all", ha, Bl * L * Hs * D / fa_size * a, Y, "attn.out.all_to_all")
        add("all-gather", ea, Bl * L * c_mid / st_size * a, Y, f"{name}.mid.all_gather")
        add("all-gather", wg, (c_mid / st_size + s_rows * nc) * E / e_size * w, Y, f"{name}.w_out.gather")
        gather_or_loop("reduce-scatter", ag, Bl * L * E / e_size * a, f"{name}.out.reduce_scatter")
    allx = live_axes("xyz", m)
    Vs = served_vocab(cfg, m)
    Lout = L if (phase == "prefill" and all_logits) else 1
    add("reduce-scatter", allx, B * L * E * a, 1, "embed.reduce_scatter")
    add("all-gather", allx, B * Lout * E * a, 1, "final.hidden.all_gather")
    add("all-gather", allx, B * Lout * Vs * LOGIT_BYTES, 1, "logits.all_gather")
    return out


def totals(collectives: list[Collective]) -> dict[str, float]:
    """Bytes per device per kind: sum(bytes * count), every kind present (0 when unused)."""
    t = {k: 0.0 for k in COLLECTIVE_KINDS}
    for c in collectives:
        t[c.kind] += c.bytes * c.count
    return t


# ---- memory per device -------------------------------------------------------------------------------
def kv_cache_bytes_per_device(cfg, layout: Layout, batch: int, seq_len: int, kv_bytes: float = 2) -> float:
    """K and V of all layers on one device: batch layout B_xyz S K_s D; heads layout
    B_(batch axes) S slots_(head axes) D with slots = kv_slots (K/V replicated where K_s < n)."""
    m = layout.mesh
    B = padded_batch(batch, layout)
    ba, ha = attention_axes(layout)
    heads = served_heads(cfg, m)[1] if layout.attention == "batch" else kv_slots(cfg, m)
    return 2 * cfg.n_layers * (B / m.size(ba)) * seq_len * (heads / m.size(ha)) * cfg.d_head * kv_bytes


def weight_bytes_per_device(cfg, layout: Layout) -> float:
    """Stored parameters on one device. Matrices are split over all n devices (fused input matrix
    E_x C_zy, fused output matrix C_zy E_x; embedding / output projection V_xyz); int8 scales are
    split like their columns; norms and biases are O(E + C) per layer and replicated in f32."""
    m = layout.mesh
    n, w = m.n, layout.bytes_per_weight
    E, Y = cfg.d_model, cfg.n_layers
    Vs = served_vocab(cfg, m)
    int8 = layout.weights == "int8"
    total = 0.0
    one_d = layout.ffn == "ws1d"
    for _, c_in, c_mid, _ in _units(cfg, m):
        total += Y * (E * c_in + c_mid * E) / n * w
        if int8:  # scales split like their columns: C_zy (1D: C_zyx), E_x (1D: E replicated)
            total += Y * (c_in / (n if one_d else m.y * m.z) + (E if one_d else E / m.x)) * 4
    Hs, _ = served_heads(cfg, m)
    Kx = kv_slots(cfg, m)
    small = cfg.norms_per_layer * cfg.norm_params
    if cfg.qkv_bias:
        small += (Hs + 2 * Kx) * cfg.d_head
    if cfg.mlp_bias:
        small += (2 if cfg.gated_mlp else 1) * cfg.d_ff
    n_out_bias = int(cfg.out_bias) + int(cfg.mlp_bias)
    if n_out_bias:  # the parallel block adds both output biases as one
        small += E * (1 if cfg.block == "parallel" else n_out_bias)
    total += Y * small * 4 + cfg.norm_params * 4
    n_vocab_mats = 1 if cfg.tie_embeddings else 2
    total += n_vocab_mats * Vs * E / n * w
    if int8:
        total += n_vocab_mats * Vs / n * 4
    if cfg.lm_head_bias:
        total += Vs / n * 4
    return total
