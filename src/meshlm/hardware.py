"""Chip specs for the cost model: vendor peaks, interconnect topology, and the few global
constants that turn peaks into achievable rates (docs/costmodel.md justifies each one).

Pure Python, no JAX import. A spec is a frozen dataclass; `load_chip(name_or_path)` takes a
preset name or a JSON file with the same fields (what `meshlm calibrate` writes for a CPU host).

"Network bandwidth" (the paper's App. A.1 `bw`) is the bandwidth of ONE torus axis, the two links
of that axis (2 x 45 GB/s = 90 GB/s on TPU v4), for a collective over any group of axes: a
multi-axis collective runs one ring per axis in sequence and its phase times telescope to
D/bw_axis * (K-1)/K. The paper's 270 GB/s is the per-chip aggregate of all six links
(`chip_link_bw`). On an NVLink switch a group gets the GPU's NVLink bandwidth while it fits in one
switch domain. docs/costmodel.md explains the choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlm.errors import MeshlmError
from meshlm.layouts import BYTES_PER_WEIGHT, KV_FORMATS, MeshShape
from meshlm.paths import home

TOPOLOGIES = ("3d-torus", "2d-torus", "nvlink-switch", "switch")
# the measured fields that map each phase (prefill, decode) to seconds
PHASE_FIELDS = ("pass_overhead_s", "layer_overhead_s", "score_elem_s", "kv_elem_s", "act_elem_s")
MAP_FIELDS = (*PHASE_FIELDS, "kv_format_elem_s")  # the measured fields that map a key to seconds
# the measured fields that map a weight format to a curve: the units of its [x, y] pairs
CURVE_FIELDS = {"matmul_curve": ("M", "FLOP/s"), "stream_curve": ("bytes", "bytes/s")}
GiB = 1024**3


@dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s per chip (vendor peak)
    hbm_bytes: float  # memory capacity per chip
    hbm_bw: float  # memory bandwidth per chip, bytes/s (vendor peak)
    link_bw: float  # one-way bandwidth of one interconnect link (torus) or of the chip's switch port, bytes/s
    topology: str  # one of TOPOLOGIES
    torus_dims: int = 0  # physical torus dimensions (3 for v4/v5p, 2 for v5e/v6e; 0 for switches)
    switch_domain: int = 0  # chips behind one switch (NVLink: 8); 0 for a torus
    scaleout_bw: float = 0.0  # per-chip bandwidth between switch domains (InfiniBand), bytes/s
    wraparound_min_chips: int = 0  # torus slices smaller than this have no wraparound links (TPU v4: 64)
    # ---- global achievable-fraction constants (not vendor numbers; docs/costmodel.md) ----------
    flops_efficiency: float = 0.8  # fraction of peak FLOP/s large matmuls sustain
    hbm_efficiency: float = 0.8  # fraction of peak HBM bandwidth streaming reads sustain
    hop_latency_s: float = 3e-6  # fixed cost of one ring step of a collective (sync + link latency)
    vendor_peaks: tuple[str, ...] = ("peak_flops", "hbm_bytes", "hbm_bw", "link_bw")
    source: str = ""
    # ---- what the engine runs on this chip (measured specs, `meshlm calibrate`) ----------------
    act_bytes: int = 2  # bytes per activation / KV-cache element: 2 (bf16) on accelerators, 4 (f32) on CPU
    # matmul FLOP/s per weight format where it differs from peak_flops, e.g. (("int8", 9e10),):
    # the CPU int8 path dequantizes blocks and multiplies in f32, at its own measured rate
    weight_flops: tuple[tuple[str, float], ...] = ()
    # ---- what the engine costs on this chip, measured (absent from presets: the paper's model) ---
    # achieved matmul FLOP/s per device against M, the rows of the activation, per weight format,
    # e.g. (("f32", ((1, 1.5e10), (4, 6e10), ..., (4096, 3.9e11))),): measured with weights larger
    # than the last-level cache, so small M includes the weight streaming (docs/costmodel.md)
    matmul_curve: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()
    matmul_curve_bytes: float = 0.0  # weight bytes per device the curve's streamed points (M < 256) read
    # one row of x through a chain of `bytes` of weights per device, read again and again: bytes/s
    # against the working set, per weight format, e.g. (("int8", ((8 << 20, 6e10), (1 << 30, 2.2e10))),).
    # A pass whose weights (and cache) fit in the last-level cache streams them faster than the
    # curve's chain did; matmul_rate moves the curve's streaming share by the difference
    stream_curve: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()
    pass_overhead_s: tuple[tuple[str, float], ...] = ()  # per phase: fixed seconds of one engine pass
    layer_overhead_s: tuple[tuple[str, float], ...] = ()  # per phase: fixed seconds per layer per pass
    logit_elem_s: float = 0.0  # seconds per sampled logit (B x V per pass): argmax/sampling over V
    # per phase: seconds per attention score (B H L S per layer) beyond its FLOPs and the KV read
    score_elem_s: tuple[tuple[str, float], ...] = ()
    # prefill's seconds per score against the sequences per chip, e.g. ((1, 2.9e-9), (4, 1.6e-9)):
    # replaces score_elem_s["prefill"] when present (the engine's attention is cheaper per score
    # on more sequences at once)
    prefill_score_curve: tuple[tuple[int, float], ...] = ()
    # per phase: seconds per cached K/V element a pass reads, beyond the bandwidth term (the
    # engine's per-position K/V handling: slice copies, writes back)
    kv_elem_s: tuple[tuple[str, float], ...] = ()
    # decode's seconds per cached K/V element beyond the bandwidth term, per cache format measured
    # (layouts.KV_FORMATS), e.g. (("f32", 2e-11), ("bf16", 3e-11)): replaces kv_elem_s["decode"]
    # (which is priced per byte) for a cache of that format; the bf16 kernel does more per byte
    kv_format_elem_s: tuple[tuple[str, float], ...] = ()
    # per phase: seconds per activation element a layer writes between its matmuls, per token
    # (norms, RoPE, the attention's reshapes, residuals, the gated activation;
    # costmodel.layer_act_elems)
    act_elem_s: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise MeshlmError(f"chip {self.name!r}: topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        positive = ("peak_flops", "hbm_bytes", "hbm_bw", "link_bw", "flops_efficiency", "hbm_efficiency")
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise MeshlmError(f"chip {self.name!r}: {f} must be a positive number, got {v!r}")
        if not (0 < self.flops_efficiency <= 1 and 0 < self.hbm_efficiency <= 1):
            raise MeshlmError(f"chip {self.name!r}: efficiencies must be in (0, 1]")
        if self.act_bytes not in (1, 2, 4):
            raise MeshlmError(f"chip {self.name!r}: act_bytes must be 1, 2 or 4, got {self.act_bytes!r}")
        for fmt, v in self.weight_flops:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise MeshlmError(f"chip {self.name!r}: weight_flops[{fmt!r}] must be a positive number, got {v!r}")
        if self.hop_latency_s < 0:
            raise MeshlmError(f"chip {self.name!r}: hop_latency_s must be >= 0")
        for what, (x, y) in CURVE_FIELDS.items():
            for fmt, pts in getattr(self, what):
                xs = [m for m, _ in pts]
                if not pts or xs != sorted(set(xs)) or any(not _positive(v) or not _positive(m) for m, v in pts):
                    raise MeshlmError(f"chip {self.name!r}: {what}[{fmt!r}] must be [{x}, {y}] pairs with "
                                      f"increasing positive {x} and positive {y}")
        if not _nonnegative(self.matmul_curve_bytes) or (self.stream_curve and not self.matmul_curve_bytes):
            raise MeshlmError(f"chip {self.name!r}: matmul_curve_bytes must be a number >= 0, and > 0 with a "
                              f"stream_curve (the working set the stream curve is compared at)")
        bs = [b for b, _ in self.prefill_score_curve]
        if bs != sorted(set(bs)) or any(not _positive(b) or not _nonnegative(v) for b, v in self.prefill_score_curve):
            raise MeshlmError(f"chip {self.name!r}: prefill_score_curve must be [batch, seconds] pairs with "
                              f"increasing positive batch and seconds >= 0")
        for what in PHASE_FIELDS:
            for phase, v in getattr(self, what):
                if phase not in ("prefill", "decode") or not _nonnegative(v):
                    raise MeshlmError(f"chip {self.name!r}: {what} maps prefill/decode to seconds >= 0, "
                                      f"got {phase!r}: {v!r}")
        for fmt, v in self.kv_format_elem_s:
            if fmt not in KV_FORMATS or not _nonnegative(v):
                raise MeshlmError(f"chip {self.name!r}: kv_format_elem_s maps a KV format "
                                  f"({', '.join(KV_FORMATS)}) to seconds >= 0, got {fmt!r}: {v!r}")
        if not _nonnegative(self.logit_elem_s):
            raise MeshlmError(f"chip {self.name!r}: logit_elem_s must be a number >= 0")
        if self.topology.endswith("torus") and self.torus_dims != int(self.topology[0]):
            raise MeshlmError(f"chip {self.name!r}: a {self.topology} has torus_dims {self.topology[0]}")
        if self.topology in ("nvlink-switch", "switch") and self.switch_domain < 1:
            raise MeshlmError(f"chip {self.name!r}: a switch topology needs switch_domain >= 1")

    # ---- achievable rates ---------------------------------------------------------------------
    @property
    def flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    def flops_for(self, weights: str) -> float:
        """Achievable matmul FLOP/s with weights stored as `weights` (f32, bf16, int8)."""
        return dict(self.weight_flops).get(weights, self.peak_flops) * self.flops_efficiency

    def matmul_rate(self, weights: str, m: float, streamed: float | None = None) -> float:
        """Achievable FLOP/s of a matmul whose activation has m rows, weights stored as `weights`:
        the measured curve interpolated linearly in log M (clamped to its ends) when the spec has
        one for this format, else flops_for(weights) whatever m is (the paper's model).

        `streamed`: the bytes per device the pass reads (its working set). With a stream curve for
        the format, each weight byte costs what streaming it costs at that working set instead of
        at matmul_curve_bytes (the curve's chain): per weight, the curve's time 2m/rate less
        b/stream(matmul_curve_bytes) plus b/stream(streamed), never faster than the curve's best
        rate (compute-bound, no streaming left to save; the curve's largest M can read below its
        best, so that point is not the bound)."""
        pts = dict(self.matmul_curve).get(weights)
        if not pts:
            return self.flops_for(weights)
        rate = _interp_log(pts, m) * self.flops_efficiency
        if streamed is None or weights not in dict(self.stream_curve):
            return rate
        b = BYTES_PER_WEIGHT[weights]
        t = 2 * m / rate + b / self.stream_bw(weights, streamed) - b / self.stream_bw(weights, self.matmul_curve_bytes)
        best = max(r for _, r in pts) * self.flops_efficiency  # compute-bound: no streaming left to save
        return 2 * m / max(t, 2 * m / best)

    def stream_bw(self, weights: str, streamed: float) -> float:
        """Bytes/s of one row streaming `weights` with a working set of `streamed` bytes per device:
        the stream curve interpolated linearly in log bytes (clamped to its ends)."""
        return _interp_log(dict(self.stream_curve)[weights], streamed) * self.hbm_efficiency

    def weight_bw(self, weights: str, streamed: float | None = None) -> float:
        """Bytes/s a pass reads its weights at: mem_bw, scaled by the stream curve's rate at the
        pass's working set against its rate at the matmul curve's chain when the spec has one."""
        if streamed is None or weights not in dict(self.stream_curve):
            return self.mem_bw
        return self.mem_bw * self.stream_bw(weights, streamed) / self.stream_bw(weights, self.matmul_curve_bytes)

    def score_elem(self, phase: str, batch: float) -> float:
        """Measured seconds per attention score of `phase` with `batch` sequences per chip:
        prefill_score_curve (prefill) interpolated linearly in log batch and clamped to its ends,
        else score_elem_s (0 for presets)."""
        pts = self.prefill_score_curve if phase == "prefill" else ()
        if not pts:
            return dict(self.score_elem_s).get(phase, 0.0)
        return _interp_log(pts, batch)

    def overhead_s(self, phase: str, n_layers: int) -> float:
        """Measured fixed seconds of one engine pass of `phase` with n_layers layers (0 for presets)."""
        return dict(self.pass_overhead_s).get(phase, 0.0) + n_layers * dict(self.layer_overhead_s).get(phase, 0.0)

    @property
    def mem_bw(self) -> float:
        return self.hbm_bw * self.hbm_efficiency

    @property
    def chip_link_bw(self) -> float:
        """Per-chip injection bandwidth over every axis at once (TPU v4: 6 x 45 GB/s = 270 GB/s)."""
        if self.torus_dims:
            return 2 * self.torus_dims * self.link_bw
        return self.link_bw

    def group_bw(self, mesh: MeshShape, axes: str) -> float:
        """Bytes/s per chip for a collective over the mesh axes `axes` (see module docstring)."""
        used = [a for a in axes if mesh.size(a) > 1]
        if not used:
            return float("inf")
        if self.torus_dims:
            # A collective over several axes runs one ring per axis in sequence; the data grows by
            # k_a per phase, so the phase times telescope to D/(2 link_bw) * (K-1)/K: one axis's
            # two links, whatever the group (docs/costmodel.md, "network bandwidth").
            return 2 * self.link_bw
        return self.link_bw if self.in_switch_domain(mesh, axes) else self.scaleout_bw or self.link_bw

    def in_switch_domain(self, mesh: MeshShape, axes: str) -> bool:
        """Chips are numbered with z minor: a group stays in one switch domain when the block of
        axes from its most-major axis down to z fits in the domain."""
        if not self.switch_domain:
            return True
        major = min("xyz".index(a) for a in axes)
        return mesh.size("xyz"[major:]) <= self.switch_domain

    def ring_factor(self, mesh: MeshShape, axes: str) -> float:
        """App. A.1's (K-1)/K. Without wraparound an axis is a line: its middle link carries half
        the data each way, so the time is D/bw with no (K-1)/K saving."""
        k = mesh.size(axes)
        if self.torus_dims and mesh.n < self.wraparound_min_chips:
            return 1.0
        return (k - 1) / k

    def ring_steps(self, mesh: MeshShape, axes: str) -> int:
        """Sequential ring steps of one collective: one ring per torus axis, one ring on a switch."""
        if self.torus_dims:
            return sum(mesh.size(a) - 1 for a in axes)
        return mesh.size(axes) - 1

    def mesh_shapes(self, n_chips: int) -> list[MeshShape]:
        """Candidate meshes for n chips. On a 3D torus the mesh is a physical slice (the paper's
        X, Y, Z are torus axes): power-of-two sides within 2x of each other (TPU v4: 2x2x2,
        2x2x4, 2x4x4, 4x4x4, 4x4x8, ...), in every orientation. Elsewhere any factorization."""
        every = MeshShape.all_for(n_chips)
        if self.torus_dims != 3:
            return every
        out = []
        for m in every:
            a, b, c = sorted(m.as_tuple())
            if all(v & (v - 1) == 0 for v in (a, b, c)) and c <= 2 * b and b <= 2 * a and (n_chips < 8 or a >= 2):
                out.append(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vendor_peaks"] = list(self.vendor_peaks)
        d["weight_flops"] = [list(p) for p in self.weight_flops]
        # the measured fields are written only when present: a preset's JSON stays what it was
        for f, empty in (("logit_elem_s", 0.0), ("prefill_score_curve", ()), ("matmul_curve_bytes", 0.0),
                         *((f, ()) for f in (*CURVE_FIELDS, *MAP_FIELDS))):
            if getattr(self, f) == empty:
                del d[f]
        for f in CURVE_FIELDS:
            if getattr(self, f):
                d[f] = {fmt: [list(p) for p in pts] for fmt, pts in getattr(self, f)}
        if self.prefill_score_curve:
            d["prefill_score_curve"] = [list(p) for p in self.prefill_score_curve]
        for f in MAP_FIELDS:
            if getattr(self, f):
                d[f] = dict(getattr(self, f))
        return d


def _interp_log(pts, x: float) -> float:
    """y at x on the curve [(x, y), ...] (x increasing): linear in log x, clamped to its ends."""
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    raise AssertionError("unreachable: x is within the curve")


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _nonnegative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


# ---- presets -------------------------------------------------------------------------------------
# The efficiency constants are the same for every chip unless a measurement says otherwise
# (docs/costmodel.md: 'Constants'); they are never set per model or per configuration.
_DEFAULT_CONSTANTS = dict(flops_efficiency=0.8, hbm_efficiency=0.8, hop_latency_s=3e-6)

CHIPS: dict[str, ChipSpec] = {
    c.name: c
    for c in [
        # [P] §4: 275 TFLOP/s bf16, 32 GiB HBM at 1.2 TB/s, 270 GB/s = 6 links x 45 GB/s, 3D torus.
        ChipSpec("tpu-v4", 275e12, 32 * GiB, 1.2e12, 45e9, "3d-torus", torus_dims=3, wraparound_min_chips=64, **_DEFAULT_CONSTANTS,
                 source="Pope et al. 2022 §4; links: scaling-book tpus.md"),
        ChipSpec("tpu-v5e", 197e12, 16 * GiB, 8.1e11, 45e9, "2d-torus", torus_dims=2, **_DEFAULT_CONSTANTS,
                 source="cloud.google.com/tpu/docs/v5e; scaling-book tpus.md"),
        ChipSpec("tpu-v5p", 459e12, 95 * GiB, 2.765e12, 90e9, "3d-torus", torus_dims=3, **_DEFAULT_CONSTANTS,
                 source="cloud.google.com/tpu/docs/v5p; scaling-book tpus.md"),
        ChipSpec("tpu-v6e", 918e12, 32 * GiB, 1.64e12, 90e9, "2d-torus", torus_dims=2, **_DEFAULT_CONSTANTS,
                 source="cloud.google.com/tpu/docs/v6e; scaling-book tpus.md"),
        # NVIDIA datasheets: dense bf16 (no sparsity); NVLink is quoted bidirectional, halved here.
        ChipSpec("a100-80g", 312e12, 80 * GiB, 2.039e12, 300e9, "nvlink-switch", switch_domain=8,
                 scaleout_bw=25e9, **_DEFAULT_CONSTANTS, source="NVIDIA A100 datasheet (SXM4 80GB), NVLink3 600 GB/s, HDR IB 200 Gb/s"),
        ChipSpec("h100-sxm", 989e12, 80 * GiB, 3.35e12, 450e9, "nvlink-switch", switch_domain=8,
                 scaleout_bw=50e9, **_DEFAULT_CONSTANTS, source="NVIDIA H100 datasheet (SXM5), NVLink4 900 GB/s, NDR IB 400 Gb/s"),
        ChipSpec("h200", 989e12, 141e9, 4.8e12, 450e9, "nvlink-switch", switch_domain=8,
                 scaleout_bw=50e9, **_DEFAULT_CONSTANTS, source="NVIDIA H200 datasheet (SXM), NVLink4 900 GB/s, NDR IB 400 Gb/s"),
    ]
}

_FIELDS = {f.name for f in dataclasses.fields(ChipSpec)}
_REQUIRED = {"name", "peak_flops", "hbm_bytes", "hbm_bw", "link_bw", "topology"}


def chip_from_dict(d: Any, where: str = "chip spec") -> ChipSpec:
    if not isinstance(d, dict):
        raise MeshlmError(f"{where} must be a JSON object")
    unknown = sorted(set(d) - _FIELDS)
    missing = sorted(_REQUIRED - set(d))
    if unknown:
        raise MeshlmError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if missing:
        raise MeshlmError(f"{where}: missing field(s) {', '.join(missing)}")
    d = dict(d)
    if "vendor_peaks" in d:
        d["vendor_peaks"] = tuple(d["vendor_peaks"])
    if "weight_flops" in d:
        try:
            d["weight_flops"] = tuple((str(k), v) for k, v in _pairs(d["weight_flops"]))
        except (TypeError, ValueError):
            raise MeshlmError(f"{where}: weight_flops must be a list of [format, FLOP/s] pairs") from None
    for f, (x, y) in CURVE_FIELDS.items():
        if f in d:
            try:
                d[f] = tuple((str(fmt), tuple((int(m), v) for m, v in pts)) for fmt, pts in _pairs(d[f]))
            except (TypeError, ValueError):
                raise MeshlmError(f"{where}: {f} must map a weight format to [{x}, {y}] pairs") from None
    if "prefill_score_curve" in d:
        try:
            d["prefill_score_curve"] = tuple((int(b), v) for b, v in d["prefill_score_curve"])
        except (TypeError, ValueError):
            raise MeshlmError(f"{where}: prefill_score_curve must be a list of [batch, seconds] pairs") from None
    for f in MAP_FIELDS:
        if f in d:
            try:
                d[f] = tuple((str(k), v) for k, v in _pairs(d[f]))
            except (TypeError, ValueError):
                keys = "a KV format" if f == "kv_format_elem_s" else "prefill/decode"
                raise MeshlmError(f"{where}: {f} must map {keys} to seconds") from None
    try:
        return ChipSpec(**d)
    except TypeError as e:
        raise MeshlmError(f"{where}: {e}") from None


def _pairs(v: Any):
    """(key, value) pairs of a JSON object or of a list of two-element lists."""
    if isinstance(v, dict):
        return v.items()
    if isinstance(v, (list, tuple)):
        return [tuple(p) for p in v]
    raise TypeError(v)


def local_spec_path() -> Path:
    """Where `meshlm calibrate` writes by default: what `--hardware local` reads."""
    return home() / "local.json"


def load_chip(name_or_path: str) -> ChipSpec:
    """A preset name, 'local' (the last `meshlm calibrate` spec) or a JSON file with one ChipSpec."""
    if name_or_path in CHIPS:
        return CHIPS[name_or_path]
    if name_or_path == "local":
        p = local_spec_path()
        if not p.is_file():
            raise MeshlmError(f"no local chip spec at {p}; run `meshlm calibrate` first")
    else:
        p = Path(name_or_path)
    if not p.is_file():
        raise MeshlmError(f"unknown chip {name_or_path!r}; known: {', '.join(CHIPS)}, local, or a path to a JSON spec")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeshlmError(f"cannot read chip spec {p}: {e}") from None
    return chip_from_dict(d, where=f"chip spec {p}")


def save_chip(chip: ChipSpec, path: str | Path) -> None:
    Path(path).write_text(json.dumps(chip.to_dict(), indent=2) + "\n")
