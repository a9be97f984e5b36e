"""Layouts as data, in the paper's notation (Pope et al. §3, Fig. 2, Fig. A.2).

A `Layout` names an FFN partitioning, an attention partitioning, a weight format, a mesh
shape and (optionally) the KV cache's element format. The same object is priced by `meshlm.costmodel`, executed by the sharded model and
checked against the compiled HLO. Pure Python: no JAX import here.

Sharding specs are strings like ``"B_x L E_yz"``: upper-case letters are tensor dimensions (see
the glossary in `meshlm.model`), the lower-case letters after ``_`` are the mesh axes the
dimension is split over, major axis first. A mesh axis that appears nowhere means replicated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from meshlm.errors import MeshlmError

AXES = ("x", "y", "z")
FFN_LAYOUTS = ("ws1d", "ws2d", "wg-x", "wg-xy", "wg-xyz")
ATTN_LAYOUTS = ("heads", "batch")
WEIGHT_FORMATS = ("bf16", "int8", "f32")
PHASES = ("prefill", "decode")
BYTES_PER_WEIGHT = {"bf16": 2, "int8": 1, "f32": 4}
KV_FORMATS = ("f32", "bf16")  # a KV cache's elements; a layout without one caches in the activation dtype


# ---- mesh shapes ---------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class MeshShape:
    x: int
    y: int
    z: int

    def __post_init__(self) -> None:
        if min(self.x, self.y, self.z) < 1:
            raise MeshlmError(f"mesh axes must be >= 1, got {self}")

    @property
    def n(self) -> int:
        return self.x * self.y * self.z

    def size(self, axes: str) -> int:
        """Number of devices along a group of axes, e.g. size('yz') = Y*Z."""
        return _prod(getattr(self, a) for a in axes)

    def __str__(self) -> str:
        return f"{self.x}x{self.y}x{self.z}"

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.x, self.y, self.z)

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        parts = text.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise MeshlmError(f"mesh must look like 4x4x4 (X x Y x Z), got {text!r}") from None
        if not 1 <= len(dims) <= 3 or min(dims) < 1:
            raise MeshlmError(f"mesh must look like 4x4x4 (X x Y x Z) with positive sizes, got {text!r}")
        dims += [1] * (3 - len(dims))
        return cls(*dims)

    @classmethod
    def all_for(cls, n_chips: int) -> list["MeshShape"]:
        """Every (X, Y, Z) with X*Y*Z = n_chips."""
        if n_chips < 1:
            raise MeshlmError(f"number of chips must be >= 1, got {n_chips}")
        divs = [d for d in range(1, n_chips + 1) if n_chips % d == 0]
        return [cls(x, y, n_chips // (x * y)) for x, y in itertools.product(divs, divs) if n_chips % (x * y) == 0]


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


# ---- sharding specs in the paper's notation ----------------------------------------------------
def parse_spec(spec: str) -> list[tuple[str, str]]:
    """'B_x L E_yz' or 'BLE_xyz' -> [('B', 'x'), ('L', ''), ('E', 'yz')]."""
    out: list[tuple[str, str]] = []
    i = 0
    s = spec.replace(" ", "")
    while i < len(s):
        c = s[i]
        if not c.isupper():
            raise MeshlmError(f"bad sharding spec {spec!r} at {c!r}")
        axes = ""
        if i + 1 < len(s) and s[i + 1] == "_":
            j = i + 2
            while j < len(s) and s[j].islower():
                j += 1
            axes = s[i + 2:j]
            if not axes or any(a not in AXES for a in axes):
                raise MeshlmError(f"bad mesh axes in sharding spec {spec!r}")
            i = j
        else:
            i += 1
        out.append((c, axes))
    return out


def spec_axes(spec: str) -> tuple[tuple[str, ...] | None, ...]:
    """Per dimension, the tuple of mesh axes it is split over (None: not split).

    `jax.sharding.PartitionSpec(*spec_axes(s))` is the JAX form of the paper's spec."""
    return tuple(tuple(a) if a else None for _, a in parse_spec(spec))


def shard_elems(spec: str, dims: dict[str, int], mesh: MeshShape) -> float:
    """Elements one device holds of a tensor with this spec (dims: letter -> global size)."""
    n = 1.0
    for d, axes in parse_spec(spec):
        n *= dims[d] / mesh.size(axes)
    return n


# ---- FFN layouts (Fig. 2, Fig. A.2) -------------------------------------------------------------
@dataclass(frozen=True)
class FfnPlan:
    """How one FFN layout moves data. Axis groups are strings of mesh axes ('' = none).

    resid:      spec of the residual stream between layers (the FFN's input and output)
    act_gather: axes the input activation is all-gathered over before the first matmul
    weight_gather: axes the stored weights are all-gathered over (weight-gathered layouts)
    batch_axes: axes B stays split over inside the layer (the stationary activation path)
    e_axes, f_axes: axes E and F of the weights are split over *after* the weight gather
    storage:    spec of the stored W_in (W_out is its transpose); ws1d is the only layout that
                cannot share the 2D storage `E_x F_yz`.
    """

    name: str
    resid: str
    act_gather: str
    weight_gather: str
    batch_axes: str
    e_axes: str
    f_axes: str
    storage: str = "E_x F_yz"


FFN_PLANS: dict[str, FfnPlan] = {
    p.name: p
    for p in [
        FfnPlan("ws1d", resid="BLE_xyz", act_gather="xyz", weight_gather="", batch_axes="", e_axes="",
                f_axes="xyz", storage="E F_xyz"),
        FfnPlan("ws2d", resid="BLE_xyz", act_gather="yz", weight_gather="", batch_axes="", e_axes="x", f_axes="yz"),
        FfnPlan("wg-x", resid="B_x L E_yz", act_gather="yz", weight_gather="x", batch_axes="x", e_axes="",
                f_axes="yz"),
        FfnPlan("wg-xy", resid="B_xy L E_z", act_gather="z", weight_gather="xy", batch_axes="xy", e_axes="",
                f_axes="z"),
        FfnPlan("wg-xyz", resid="B_xyz L E", act_gather="", weight_gather="xyz", batch_axes="xyz", e_axes="",
                f_axes=""),
    ]
}


# ---- a whole layout ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    ffn: str
    attention: str
    weights: str
    mesh: MeshShape
    collective_matmul: bool = False  # looped collective einsum (§3.5) instead of plain collectives
    kv_cache: str | None = None  # KV_FORMATS; None: the activation dtype (the chip's act_bytes)

    def __post_init__(self) -> None:
        if self.ffn not in FFN_LAYOUTS:
            raise MeshlmError(f"unknown FFN layout {self.ffn!r}; known: {', '.join(FFN_LAYOUTS)}")
        if self.attention not in ATTN_LAYOUTS:
            raise MeshlmError(f"unknown attention layout {self.attention!r}; known: {', '.join(ATTN_LAYOUTS)}")
        if self.weights not in WEIGHT_FORMATS:
            raise MeshlmError(f"unknown weight format {self.weights!r}; known: {', '.join(WEIGHT_FORMATS)}")
        if self.kv_cache is not None and self.kv_cache not in KV_FORMATS:
            raise MeshlmError(f"unknown KV cache format {self.kv_cache!r}; known: {', '.join(KV_FORMATS)}")

    @property
    def plan(self) -> FfnPlan:
        return FFN_PLANS[self.ffn]

    @property
    def bytes_per_weight(self) -> int:
        return BYTES_PER_WEIGHT[self.weights]

    def kv_elem_bytes(self, act_bytes: int) -> int:
        """Bytes per cached K/V element: the KV format's, else the activations' (`act_bytes`)."""
        return BYTES_PER_WEIGHT[self.kv_cache] if self.kv_cache else act_bytes

    def kv_format(self, act_bytes: int) -> str | None:
        """The KV format the cache is held in: the layout's, else the activations' (f32 for 4
        bytes, bf16 for 2; None for any other width)."""
        return self.kv_cache or {4: "f32", 2: "bf16"}.get(act_bytes)

    @property
    def short(self) -> str:
        """'ws2d/batch', the form the CLI takes for --prefill-layout / --decode-layout."""
        return f"{self.ffn}/{self.attention}"

    def __str__(self) -> str:
        cm = "+cm" if self.collective_matmul else ""
        kv = f"+kv-{self.kv_cache}" if self.kv_cache else ""
        return f"{self.ffn}/{self.attention}/{self.weights}@{self.mesh}{cm}{kv}"

    def to_dict(self) -> dict:
        return {"ffn": self.ffn, "attention": self.attention, "weights": self.weights,
                "mesh": list(self.mesh.as_tuple()), "collective_matmul": self.collective_matmul,
                "kv_cache": self.kv_cache}


def parse_phase_layout(text: str) -> tuple[str, str]:
    """'ws2d/batch' -> ('ws2d', 'batch'), with clear errors."""
    parts = text.split("/")
    if len(parts) != 2 or parts[0] not in FFN_LAYOUTS or parts[1] not in ATTN_LAYOUTS:
        raise MeshlmError(f"layout must be FFN/ATTENTION with FFN in {FFN_LAYOUTS} and ATTENTION in "
                          f"{ATTN_LAYOUTS}, got {text!r}")
    return parts[0], parts[1]
