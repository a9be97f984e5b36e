"""Analytical cost model (Pope et al. 2022, §2 and App. A): time, memory, MFU and cost of one
inference phase of a model under one layout. Pure Python, no JAX import.

Communication is never invented here: the collectives of a forward pass come from
`meshlm.comm.forward_collectives`, the inventory the sharded executor runs (checked against its
compiled HLO). This module only prices them. docs/costmodel.md explains every formula.

Per forward pass, on one chip (n = X*Y*Z chips, T = B*L tokens in the pass, S = cached length):
    matmul  = 2 N_served T / n  FLOPs       / (peak * flops_efficiency)
    attn    = 4 T S H D n_layers / n FLOPs  / (peak * flops_efficiency)
    weights = bytes of weights the chip's matmuls read       / (hbm_bw * hbm_efficiency)
    kv      = KV-cache bytes the chip reads (comm.kv_cache_bytes_per_device)
    each collective = bytes/bw * (K-1)/K * kind factor + ring steps * hop latency (App. A.1)
    pass    = max(matmul, weights) + max(attn, kv)
              + activation collectives + max(0, weight gathers - matmul) + ring-step latencies
i.e. a roofline per op class (weight matmuls are bound by FLOPs or by weight loading; attention by
FLOPs or by KV loading) plus the communication that is exposed (weight gathers are prefetched
under the matmuls).

A calibrated local chip (`meshlm calibrate`; presets have none of this) adds what was measured
there: matmuls at the FLOP/s its curve gives for their row count M, a cost per attention score
and per cached K/V element, and the engine's fixed costs per pass, per layer and per sampled logit (docs/costmodel.md,
"Calibrated local chips"). `logits="last"` prices prefill's output projection for the last
position only, as meshlm's engine runs it; the default is the paper's 2N per token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from meshlm.config import ModelConfig
from meshlm.errors import MeshlmError
from meshlm.hardware import ChipSpec
from meshlm.layouts import PHASES, Layout

ACT_BYTES = 2  # bf16 activations on accelerators (the paper's AQT keeps activations in bf16)
KV_BYTES = 2  # bf16 K and V
# Time factor per byte relative to an all-gather of the same per-device buffer (App. A.1: an
# all-reduce is a reduce-scatter plus an all-gather; an all-to-all moves (K-1)/K of its buffer
# once, like an all-gather; a collective-permute moves its whole buffer over one link pair).
KIND_FACTOR = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
               "collective-permute": 1.0}


def _comm():
    """The executor's collective inventory (meshlm.comm, contract in docs/costmodel.md)."""
    from meshlm import comm

    return comm


# Memoised views of meshlm.comm (pure functions of hashable, frozen arguments): the planner's
# sweeps ask the same questions thousands of times.
def clear_caches() -> None:
    """Forget memoised results (benchmarks measure cold sweeps)."""
    for f in (served_heads, weight_bytes, _kv_bytes_at, matmul_params, _comm_totals):
        f.cache_clear()


@functools.lru_cache(maxsize=65536)
def served_heads(cfg: ModelConfig, mesh: Any) -> tuple[int, int]:
    return _comm().served_heads(cfg, mesh)


@functools.lru_cache(maxsize=65536)
def weight_bytes(cfg: ModelConfig, layout: Layout) -> float:
    return _comm().weight_bytes_per_device(cfg, layout)


@functools.lru_cache(maxsize=65536)
def _kv_bytes_at(cfg: ModelConfig, layout: Layout, batch: int, seq_len: int, elem: int = KV_BYTES) -> float:
    return _comm().kv_cache_bytes_per_device(cfg, layout, batch, seq_len, kv_bytes=elem)


def kv_bytes(cfg: ModelConfig, layout: Layout, batch: int, seq_len: int, elem: int = KV_BYTES) -> float:
    """KV-cache bytes per chip (elem: bytes per element, layout.kv_elem_bytes(chip.act_bytes))."""
    return _affine_in_batch(lambda b: (_kv_bytes_at(cfg, layout, b, seq_len, elem),), layout, batch)[0]


def _affine_in_batch(f: Any, layout: Layout, batch: int) -> tuple[float, ...]:
    """f(batch) from f at one and two batch multiples of the layout. Exact: every per-device
    buffer in meshlm.comm is the padded batch times a size, or independent of the batch
    (tests/test_costmodel.py checks it), and sweeps then call comm twice per layout, not per batch."""
    m = _comm().batch_multiple(layout)
    bp = _comm().padded_batch(batch, layout)
    if bp in (m, 2 * m):
        return f(bp)
    f1, f2 = f(m), f(2 * m)
    k = bp / m - 1
    return tuple(a + (b - a) * k for a, b in zip(f1, f2))


@dataclass(frozen=True)
class PassCost:
    """Seconds (and bytes) of one forward pass on one chip."""

    matmul_s: float
    attn_s: float
    weight_mem_s: float
    kv_mem_s: float
    comm_bw_s: float  # exposed bandwidth term of the collectives (see forward_pass)
    comm_latency_s: float  # ring-step latency term of every collective
    comm_bytes: float  # bytes this chip sends per pass (sum of collective buffers)
    score_mem_s: float = 0.0  # measured cost of the materialised L x S attention scores (calibrated chips)
    kv_extra_s: float = 0.0  # measured per-K/V-element handling beyond the bandwidth read (calibrated chips)
    overhead_s: float = 0.0  # measured costs: per pass, per layer, per activation element, sampling over V (calibrated chips)

    @property
    def compute_s(self) -> float:
        return self.matmul_s + self.attn_s

    @property
    def memory_s(self) -> float:
        return self.weight_mem_s + self.kv_mem_s + self.score_mem_s + self.kv_extra_s

    @property
    def communication_s(self) -> float:
        return self.comm_bw_s + self.comm_latency_s

    @property
    def total_s(self) -> float:
        return (max(self.matmul_s, self.weight_mem_s) + max(self.attn_s, self.kv_mem_s) + self.score_mem_s
                + self.kv_extra_s + self.communication_s + self.overhead_s)

    def scaled(self, k: float) -> "PassCost":
        return PassCost(*(getattr(self, f) * k for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class Estimate:
    """One layout evaluated for one phase; `to_dict()` gives the CLI's JSON fields."""

    model: str
    chip: str
    phase: str
    batch: int
    input_len: int
    gen_len: int
    layout: Layout
    latency_s: float  # the whole phase (prefill pass, or all gen_len decode steps)
    step_latency_s: float  # decode: mean per step; prefill: = latency_s
    mfu: float
    cost_chip_ms_per_token: float
    memory_per_chip_bytes: float
    memory: dict[str, float]  # weights, kv_cache, working_set
    fits: bool
    breakdown: dict[str, float]  # seconds over the phase
    comm_bytes_per_chip: float  # over the phase

    @property
    def ffn(self) -> str:
        return self.layout.ffn

    @property
    def attention(self) -> str:
        return self.layout.attention

    @property
    def weights(self) -> str:
        return self.layout.weights

    @property
    def mesh(self) -> list[int]:
        return list(self.layout.mesh.as_tuple())

    def to_dict(self) -> dict[str, Any]:
        return {"ffn": self.ffn, "attention": self.attention, "weights": self.weights, "mesh": self.mesh,
                "kv_cache": self.layout.kv_cache, "n_chips": self.layout.mesh.n, "phase": self.phase,
                "batch": self.batch,
                "input_len": self.input_len, "gen_len": self.gen_len, "latency_s": self.latency_s,
                "step_latency_s": self.step_latency_s, "mfu": self.mfu,
                "cost_chip_ms_per_token": self.cost_chip_ms_per_token,
                "memory_per_chip_bytes": self.memory_per_chip_bytes, "memory": dict(self.memory),
                "fits": self.fits, "breakdown": dict(self.breakdown),
                "comm_bytes_per_chip": self.comm_bytes_per_chip}


# ---- building blocks -------------------------------------------------------------------------
def collective_time(chip: ChipSpec, layout: Layout, kind: str, axes: str, nbytes: float) -> tuple[float, float]:
    """(bandwidth seconds, latency seconds) of one collective: App. A.1's D/bw * (K-1)/K."""
    mesh = layout.mesh
    k = mesh.size(axes)
    if k <= 1 or nbytes <= 0:
        return 0.0, 0.0
    try:
        factor = KIND_FACTOR[kind]
    except KeyError:
        raise MeshlmError(f"unknown collective kind {kind!r}") from None
    bw = chip.group_bw(mesh, axes)
    steps = chip.ring_steps(mesh, axes) * (2 if kind == "all-reduce" else 1)
    return factor * nbytes / bw * chip.ring_factor(mesh, axes), steps * chip.hop_latency_s


def served_batch(batch: int, layout: Layout) -> int:
    """Sequences the executor computes: the batch padded so it splits over the layout's batch axes."""
    return _comm().padded_batch(batch, layout)


@functools.lru_cache(maxsize=4096)
def matmul_params(cfg: ModelConfig, n_heads: int) -> int:
    """Parameters that multiply every token: N as served (padded heads) without the input embedding
    (a lookup, not a matmul) but with the output projection; tied embeddings count once."""
    return cfg.n_params(n_heads) - (cfg.vocab * cfg.d_model if not cfg.tie_embeddings else 0)


def is_weight_gather(c: Any) -> bool:
    """Weight all-gathers (labels '<unit>.w_in.gather' / '.w_out.gather' in meshlm.comm) do not
    depend on this layer's activations, so they can be prefetched under the matmuls."""
    return c.kind == "all-gather" and ".w_" in c.what


def comm_totals(cfg: ModelConfig, chip: ChipSpec, layout: Layout, phase: str, batch: int, q_len: int,
                kv_len: int) -> tuple[float, ...]:
    """(activation bandwidth s, weight-gather bandwidth s, latency s, bytes) of every collective
    of one forward pass."""
    return _affine_in_batch(lambda b: _comm_totals(cfg, chip, layout, phase, b, q_len, kv_len), layout, batch)


@functools.lru_cache(maxsize=65536)
def _comm_totals(cfg: ModelConfig, chip: ChipSpec, layout: Layout, phase: str, batch: int, q_len: int,
                 kv_len: int) -> tuple[float, float, float, float]:
    """comm_totals at exactly this batch (one call of comm.forward_collectives)."""
    act_s = w_s = lat_s = nbytes = 0.0
    for c in _comm().forward_collectives(cfg, layout, phase, batch, q_len, kv_len, act_bytes=chip.act_bytes):
        t_bw, t_lat = collective_time(chip, layout, c.kind, c.axes, c.bytes)
        if is_weight_gather(c):
            w_s += t_bw * c.count
        else:
            act_s += t_bw * c.count
        lat_s += t_lat * c.count
        nbytes += c.bytes * c.count
    return act_s, w_s, lat_s, nbytes


def collective_breakdown(cfg: ModelConfig, chip: ChipSpec, layout: Layout, phase: str, batch: int,
                         input_len: int, gen_len: int) -> list[dict[str, Any]]:
    """Each collective of the phase: label, kind, axes, bytes per occurrence, occurrences over the
    phase, and its seconds over the phase (bandwidth + ring steps, before any hiding; weight
    gathers are marked `prefetched`, see forward_pass)."""
    q_len, steps = (input_len, 1) if phase == "prefill" else (1, gen_len)
    kv_len = input_len if phase == "prefill" else input_len + gen_len
    rows = []
    for c in _comm().forward_collectives(cfg, layout, phase, batch, q_len, kv_len, act_bytes=chip.act_bytes):
        t_bw, t_lat = collective_time(chip, layout, c.kind, c.axes, c.bytes)
        rows.append({"what": c.what, "kind": c.kind, "axes": c.axes, "bytes": c.bytes, "count": c.count * steps,
                     "seconds": (t_bw + t_lat) * c.count * steps, "prefetched": is_weight_gather(c)})
    return rows


def weight_read_bytes(cfg: ModelConfig, layout: Layout) -> float:
    """Weight bytes one chip streams from HBM per pass: its stored shard, times the weight-gather
    group for weight-gathered layouts (the gathered copy is what the matmul reads)."""
    stored = weight_bytes(cfg, layout)
    return stored * layout.mesh.size(layout.plan.weight_gather)


def layer_act_elems(cfg: ModelConfig) -> int:
    """Activation elements one layer writes per token between its matmuls: the normed input, q|k|v,
    the attention output, the residual after it and its norm, the FFN's hidden (gate and up when
    gated, then their product) and the residual after it. A calibrated chip prices them
    (act_elem_s): at short prompts they are what a prefill spends beyond its matmuls."""
    E, D, F = cfg.d_model, cfg.d_head, cfg.d_ff
    return 4 * E + (cfg.n_heads + 2 * cfg.n_kv_heads) * D + cfg.n_heads * D + (3 if cfg.gated_mlp else 2) * F


LOGITS = ("all", "last")  # prefill's output projection: every position (the paper's 2N per token) or the last


def forward_pass(cfg: ModelConfig, chip: ChipSpec, layout: Layout, phase: str, batch: int, q_len: int,
                 kv_len: float, kv_bytes_dev: float, logits: str = "all") -> PassCost:
    """Cost of one forward pass of `q_len` tokens per sequence against `kv_len` cached ones
    (kv_bytes_dev: the KV bytes this chip reads, from comm.kv_cache_bytes_per_device).
    logits="last": the V x E output projection multiplies one position per sequence, as the
    engine's prefill does (decode has one position either way)."""
    if logits not in LOGITS:
        raise MeshlmError(f"logits must be one of {LOGITS}, got {logits!r}")
    n = layout.mesh.n
    b_served = served_batch(batch, layout)
    tokens = b_served * q_len
    h_served, _ = served_heads(cfg, layout.mesh)
    # Rows of each chip's matmuls (weight-gathered layouts keep the batch split) price them on a
    # calibrated chip's measured FLOP/s-vs-M curve; without a curve the rate is flops_for(weights).
    split = layout.mesh.size(layout.plan.batch_axes)
    n_mm = matmul_params(cfg, h_served)
    logit_tokens = b_served if logits == "last" else tokens
    # the pass's working set: where it fits a last-level cache, a calibrated chip with a stream
    # curve streams it faster than the curve's chain (ChipSpec.matmul_rate)
    streamed = weight_read_bytes(cfg, layout) + kv_bytes_dev
    rate = chip.matmul_rate(layout.weights, tokens / split, streamed)
    if logit_tokens == tokens and not chip.matmul_curve:
        matmul = 2.0 * n_mm * tokens / n / rate  # the paper's 2N per token
    else:
        n_out = cfg.vocab * cfg.d_model
        matmul = 2.0 * ((n_mm - n_out) * tokens / rate
                        + n_out * logit_tokens / chip.matmul_rate(layout.weights, logit_tokens / split, streamed)) / n
    # Q.K and P.V: 2 FLOPs x 2 einsums per (token, cached position, head, head dim); every layout
    # splits (padded) heads x sequences over all n chips.
    attn = 4.0 * tokens * kv_len * h_served * cfg.d_head * cfg.n_layers / n / chip.flops  # activations only
    wmem = weight_read_bytes(cfg, layout) / chip.weight_bw(layout.weights, streamed)
    kvmem = kv_bytes_dev / chip.mem_bw
    act_s, w_s, lat_s, nbytes = comm_totals(cfg, chip, layout, phase, batch, q_len, int(round(kv_len)))
    # Weight gathers hide under the matmuls (prefetched a layer ahead, §3.5); what is left over,
    # activation collectives (on the critical path) and ring-step latencies are exposed.
    exposed = act_s + max(0.0, w_s - matmul)
    # Calibrated chips only (0 on presets): the score tensor [B, H, L, S] of every layer is
    # materialised (and masked, softmaxed) at a measured cost per score, and every pass has fixed
    # costs plus sampling over the B x V logits.
    scores = chip.score_elem(phase, b_served / split) * tokens * kv_len * h_served * cfg.n_layers / n
    # per element of the layout's cache format where calibrate timed that format; else kv_elem_s,
    # measured per element of an act_bytes cache, priced per byte read
    per_elem = dict(chip.kv_format_elem_s).get(layout.kv_format(chip.act_bytes)) if phase == "decode" else None
    if per_elem is not None:
        kv_extra = per_elem * kv_bytes_dev / layout.kv_elem_bytes(chip.act_bytes)
    else:
        kv_extra = dict(chip.kv_elem_s).get(phase, 0.0) * kv_bytes_dev / chip.act_bytes
    overhead = (chip.overhead_s(phase, cfg.n_layers) + chip.logit_elem_s * b_served * cfg.vocab
                + dict(chip.act_elem_s).get(phase, 0.0) * tokens * layer_act_elems(cfg) * cfg.n_layers / n)
    return PassCost(matmul, attn, wmem, kvmem, exposed, lat_s, nbytes, scores, kv_extra, overhead)


def memory_per_chip(cfg: ModelConfig, layout: Layout, phase: str, batch: int, input_len: int,
                    gen_len: int, act_bytes: int = ACT_BYTES) -> dict[str, float]:
    """Bytes per chip at the end of the phase: stored weights, the KV cache, and the largest
    transient working set of one layer (gathered weights + activations of the pass)."""
    mesh, plan = layout.mesh, layout.plan
    weights = weight_bytes(cfg, layout)
    seq = input_len + (gen_len if phase == "decode" else 0)
    kv = kv_bytes(cfg, layout, batch, seq, layout.kv_elem_bytes(act_bytes))
    # The largest weight matrix after its gather (weight-gathered layouts), double-buffered so
    # the next gather overlaps this matmul (§3.5).
    gather = mesh.size(plan.weight_gather)
    gathered = 2 * cfg.d_model * cfg.d_ff * layout.bytes_per_weight / mesh.size(plan.f_axes) if gather > 1 else 0.0
    # Activations of one layer for the tokens this chip holds: the residual (E), the FFN hidden
    # (F, twice when gated) and the attention q/o rows. Scores are computed per query block
    # (flash-style), so they are not held whole.
    tokens = served_batch(batch, layout) * (input_len if phase == "prefill" else 1)
    t_local = tokens / mesh.size(plan.batch_axes)
    hidden = (2 if cfg.gated_mlp else 1) * cfg.d_ff / mesh.size(plan.f_axes)
    resid = cfg.d_model / mesh.size(plan.e_axes)
    attn_rows = 2 * cfg.n_heads * cfg.d_head / mesh.size(plan.f_axes)
    acts = t_local * (resid + hidden + attn_rows) * act_bytes
    return {"weights": weights, "kv_cache": kv, "working_set": gathered + acts}


# ---- the public entry point ----------------------------------------------------------------------
def estimate(cfg: ModelConfig, chip: ChipSpec, layout: Layout, phase: str, batch: int, input_len: int,
             gen_len: int, logits: str = "all") -> Estimate:
    """Predict one phase: prefill of batch x input_len tokens, or gen_len decode steps whose
    context grows from input_len + 1 to input_len + gen_len. logits: "all" prices prefill's
    output projection for every position (the paper's accounting), "last" for the last one only
    (what meshlm's engine runs)."""
    if phase not in PHASES:
        raise MeshlmError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    for what, v in (("batch", batch), ("input length", input_len), ("generated length", gen_len)):
        if not isinstance(v, int) or v < 1:
            raise MeshlmError(f"{what} must be a positive integer, got {v!r}")
    n = layout.mesh.n
    kv_elem = layout.kv_elem_bytes(chip.act_bytes)
    if phase == "prefill":
        kv_dev = kv_bytes(cfg, layout, batch, input_len, kv_elem)
        step = forward_pass(cfg, chip, layout, phase, batch, input_len, input_len, kv_dev, logits)
        steps, tokens = 1, batch * input_len
    else:
        # Every term is affine in the context length, so the sum over the gen_len steps equals
        # gen_len times the step at the mean context (exact, and O(1) for the planner's sweeps).
        kv_first = kv_bytes(cfg, layout, batch, input_len + 1, kv_elem)
        kv_last = kv_bytes(cfg, layout, batch, input_len + gen_len, kv_elem)
        s_mean = input_len + (gen_len + 1) / 2
        step = forward_pass(cfg, chip, layout, phase, batch, 1, s_mean, (kv_first + kv_last) / 2)
        steps, tokens = gen_len, batch * gen_len
    latency = step.total_s * steps
    mem = memory_per_chip(cfg, layout, phase, batch, input_len, gen_len, chip.act_bytes)
    total_mem = sum(mem.values())
    mfu = 2.0 * cfg.n_params_mfu * tokens / (latency * n * chip.peak_flops)
    ph = step.scaled(steps)
    breakdown = {"compute": ph.compute_s, "memory": ph.memory_s, "communication": ph.communication_s,
                 "matmul": ph.matmul_s, "attention": ph.attn_s, "weight_load": ph.weight_mem_s,
                 "kv_load": ph.kv_mem_s, "score_load": ph.score_mem_s, "kv_extra": ph.kv_extra_s,
                 "comm_bandwidth": ph.comm_bw_s,
                 "comm_latency": ph.comm_latency_s, "overhead": ph.overhead_s}
    return Estimate(model=cfg.name, chip=chip.name, phase=phase, batch=batch, input_len=input_len,
                    gen_len=gen_len, layout=layout, latency_s=latency, step_latency_s=latency / steps, mfu=mfu,
                    cost_chip_ms_per_token=1e3 * n * latency / tokens, memory_per_chip_bytes=total_mem,
                    memory=mem, fits=total_mem <= chip.hbm_bytes, breakdown=breakdown,
                    comm_bytes_per_chip=ph.comm_bytes)
