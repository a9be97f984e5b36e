"""How the sharded model stores its parameters: served (padded) heads and vocab, fused projection
matrices, int8 weights, and the PartitionSpec of every stored leaf. Host-side numpy only.

Stored tree (Y = n_layers, C = columns of a fused input matrix, C_mid = rows of a fused output),
built with the layer leaves stacked as below; `per_layer` then splits them into the tuple of Y
per-layer trees the engine stores (each shape without the leading Y):
    embed        [V_s, E]        V_xyz            (int8: {"q", "s": [V_s] replicated})
    lm_head      [E, V_s]        V_xyz            (untied only)     lm_head_bias [V_s]  V_xyz
    final_norm   {"scale": [E], "bias"?}           replicated
    layers:
      norm1, norm2? {"scale": [Y, E], "bias"?}     replicated (norm2: serial, or 2 parallel norms)
      {u}_in     [Y, E, C]       E_x C_zy  (2D storage)  |  E C_zyx  (1D storage, ws1d)
      {u}_out    [Y, C_mid, E]   C_zy E_x  (2D)          |  C_zyx E  (1D)
      {u}_bin [Y, C], {u}_bout [Y, E]                replicated, only with biases
    u: "block" (parallel: FFN and attention fused), or "attn" and "ffn" (serial).
C is ordered block by block: block j (j = z*Y + y, the device's C_zy block) holds its slice of
every segment [gate|up or in][q][k][v] in turn; in 1D storage each block is further split over x
the same way. int8: {"q": int8, "s": f32 per output column}, the scales split like their columns (C_zy / E_x /
V_xyz); weight-gathered layouts gather them inside the weight's one all-gather (4 extra int8 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jax.sharding import PartitionSpec as P

from meshlm import comm
from meshlm.errors import MeshlmError
from meshlm.layouts import MeshShape
from meshlm.quant import is_quantized, pack_panels, packable, quantize

XYZ = ("x", "y", "z")
ZY = ("z", "y")
ZYX = ("z", "y", "x")


@dataclass(frozen=True)
class Unit:
    name: str
    in_segs: tuple[tuple[str, int], ...]  # (segment, global columns)
    mid_segs: tuple[tuple[str, int], ...]  # (segment, global rows of the output matrix)
    has_attn: bool
    has_ffn: bool


class Geometry:
    """Served sizes and fused-matrix structure of a model on a mesh (independent of the layout)."""

    def __init__(self, cfg, mesh: MeshShape):
        n = mesh.n
        if cfg.d_model % n or cfg.d_ff % n:
            raise MeshlmError(f"model {cfg.name!r}: d_model ({cfg.d_model}) and d_ff ({cfg.d_ff}) must be "
                              f"multiples of the device count {n} to shard on mesh {mesh}")
        self.cfg, self.mesh = cfg, mesh
        self.Hs, self.Ks = comm.served_heads(cfg, mesh)
        self.Kx = comm.kv_slots(cfg, mesh)
        self.Gs = self.Hs // self.Ks
        self.Vs = comm.served_vocab(cfg, mesh)
        D, F = cfg.d_head, cfg.d_ff
        ffn = (("gate", F), ("up", F)) if cfg.gated_mlp else (("in", F),)
        attn = (("q", self.Hs * D), ("k", self.Kx * D), ("v", self.Kx * D))
        if cfg.block == "parallel":
            self.units = (Unit("block", ffn + attn, (("ffn", F), ("attn", self.Hs * D)), True, True),)
        else:
            self.units = (Unit("attn", attn, (("attn", self.Hs * D),), True, False),
                          Unit("ffn", ffn, (("ffn", F),), False, True))

    # ---- heads ---------------------------------------------------------------------------------
    def q_map(self) -> np.ndarray:
        """For each served query head, the model's head index (-1: padding)."""
        G, K = self.cfg.n_heads // self.cfg.n_kv_heads, self.cfg.n_kv_heads
        out = []
        for p in range(self.Hs):
            g, i = divmod(p, self.Gs)
            out.append(g * G + i if g < K and i < G else -1)
        return np.array(out)

    def kv_map(self, slots: int) -> np.ndarray:
        """For each of `slots` stored KV slots (Ks or Kx), the model's KV head (-1: padding)."""
        r = slots // self.Ks
        return np.array([s // r if s // r < self.cfg.n_kv_heads else -1 for s in range(slots)])


def take_heads(a, idx, axis: int):
    """a[..., idx, ...] along axis, zeros where idx == -1."""
    a = np.asarray(a)
    pad = np.zeros_like(np.take(a, [0], axis=axis))
    return np.take(np.concatenate([a, pad], axis=axis), np.where(idx < 0, a.shape[axis], idx), axis=axis)


def fuse(segs, nb: int, sub: int, axis: int):
    """Concatenate segments along `axis` block by block: nb blocks, each split into `sub` pieces,
    each piece holding its slice of every segment in turn."""
    parts = []
    for s in segs:
        s = np.moveaxis(np.asarray(s), axis, -1)
        parts.append(s.reshape(*s.shape[:-1], nb, sub, s.shape[-1] // (nb * sub)))
    out = np.concatenate(parts, axis=-1)
    return np.moveaxis(out.reshape(*out.shape[:-3], -1), -1, axis)


def _flat_heads(a, axis: int):
    """Merge the (heads, D) dims starting at axis into one."""
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2:])


def _segments(params, geo: Geometry) -> dict[str, tuple]:
    """Served canonical pieces per segment name: (in-matrix [Y, E, g], in-bias [Y, g] or None)."""
    lp, cfg = params["layers"], geo.cfg
    qm, km = geo.q_map(), geo.kv_map(geo.Kx)
    out = {}
    for name in ("gate", "up", "in"):
        w = lp.get("w_" + name)
        if w is not None:
            b = lp.get("b_" + name)
            out[name] = (np.asarray(w, np.float32), None if b is None else np.asarray(b, np.float32))
    for name, wkey, bkey, m in (("q", "wq", "bq", qm), ("k", "wk", "bk", km), ("v", "wv", "bv", km)):
        w = _flat_heads(take_heads(np.asarray(lp[wkey], np.float32), m, 2), 2)
        b = lp.get(bkey)
        out[name] = (w, None if b is None else _flat_heads(take_heads(np.asarray(b, np.float32), m, 1), 1))
    out["attn"] = _flat_heads(take_heads(np.asarray(lp["wo"], np.float32), qm, 1), 1)  # [Y, Hs*D, E]
    out["ffn"] = np.asarray(lp["w_out"], np.float32)
    return out


def stored_specs(geo: Geometry, storage: str, int8: bool, tree) -> dict:
    """PartitionSpec for each leaf of a stored tree (same structure)."""
    w_in = P(None, None, ZYX) if storage == "1d" else P(None, "x", ZY)
    w_out = P(None, ZYX, None) if storage == "1d" else P(None, ZY, "x")

    s_in = P(None, ZYX) if storage == "1d" else P(None, ZY)  # scales split like their columns
    s_out = P() if storage == "1d" else P(None, "x")

    def mat(spec, leaf, s_spec=P(XYZ)):
        return {"q": spec, "s": s_spec} if isinstance(leaf, dict) else spec

    specs = {"final_norm": {k: P() for k in tree["final_norm"]}, "layers": {}}
    specs["embed"] = mat(P(XYZ, None), tree["embed"])
    if "lm_head" in tree:
        specs["lm_head"] = mat(P(None, XYZ), tree["lm_head"])
    if "lm_head_bias" in tree:
        specs["lm_head_bias"] = P(XYZ)
    for k, v in tree["layers"].items():
        if k.startswith("norm"):
            specs["layers"][k] = {kk: P() for kk in v}
        elif k.endswith("_in"):
            specs["layers"][k] = mat(w_in, v, s_in)
        elif k.endswith("_out"):
            specs["layers"][k] = mat(w_out, v, s_out)
        else:
            specs["layers"][k] = P()
    return specs


def per_layer(tree, specs) -> tuple[dict, dict]:
    """Split the stacked [Y, ...] layer leaves into a tuple of Y per-layer trees (numpy views) with
    their specs minus the layer axis. The engine stores weights this way: a stacked leaf sliced per
    layer inside the compiled pass is copied out by XLA:CPU before every matmul."""
    import jax

    Y = jax.tree.leaves(tree["layers"])[0].shape[0]
    layer_specs = jax.tree.map(lambda s: P(*tuple(s)[1:]), specs["layers"], is_leaf=lambda s: isinstance(s, P))
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], tree["layers"]) for i in range(Y))
    return {**tree, "layers": layers}, {**specs, "layers": tuple(layer_specs for _ in range(Y))}


def pack_layers(tree, specs, geo: Geometry) -> tuple[dict, dict]:
    """One device's unit matrices and output projection packed panel-major (meshlm.quant.pack_panels)
    where their columns allow: int8 {"q": [R, C], "s"} -> {"p": [C/64, R, 64], "s"}, f32 [R, C] ->
    {"p": [C/64, R, 64]}, the layout the CPU kernels stream fastest (meshlm.kernels). Per-layer
    trees (after per_layer); nothing is gathered on one device, so no other code reads the
    row-major form. A parallel block with two norms keeps its
    input matrix row-major: its norm groups split the columns at any offset."""
    assert geo.mesh.n == 1, "packed weights are for one device"
    names = [f"{u.name}_out" for u in geo.units]
    names += [f"{u.name}_in" for u in geo.units if not (u.name == "block" and geo.cfg.parallel_norms == 2)]
    layers, lspecs = [], []
    for lw, ls in zip(tree["layers"], specs["layers"]):
        lw, ls = dict(lw), dict(ls)
        for k in names:
            lw[k], ls[k] = _packed(lw[k], ls[k], lambda a: a)
        layers.append(lw)
        lspecs.append(ls)
    tree, specs = {**tree, "layers": tuple(layers)}, {**specs, "layers": tuple(lspecs)}
    # the output projection: lm_head [E, V] as it is, a tied embedding [V, E] transposed (its
    # lookups then gather a column of each panel)
    k, orient = ("lm_head", lambda a: a) if "lm_head" in tree else ("embed", lambda a: a.T)
    tree[k], specs[k] = _packed(tree[k], specs[k], orient)
    return tree, specs


def _packed(w, spec, orient):
    """(leaf, spec) of weight w ([R, C] once `orient`ed) packed: int8 {"q", "s"} -> {"p", "s"}, f32
    array -> {"p"}; as they were when its columns are not whole panels or it is another format."""
    if is_quantized(w):
        q, extra = w["q"], {"s": w["s"]}
    elif isinstance(w, np.ndarray) and w.dtype == np.float32:
        q, extra = w, {}
    else:
        return w, spec
    q = orient(q)
    if not packable(q):
        return w, spec
    return {"p": pack_panels(q), **extra}, {"p": P(), **({"s": spec["s"]} if extra else {})}


def build_stored(params, geo: Geometry, weights: str, storage: str) -> dict:
    """The stored tree (numpy, global shapes) of canonical params; see the module docstring."""
    cfg, m = geo.cfg, geo.mesh
    X, YZ = m.x, m.y * m.z
    int8 = weights == "int8"
    wdt = {"f32": np.float32, "bf16": None, "int8": None}[weights]
    segs = _segments(params, geo)
    sub = X if storage == "1d" else 1

    def cast(a):
        if weights == "bf16":
            import ml_dtypes

            return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)
        return np.asarray(a, wdt)

    layers: dict = {}
    lp = params["layers"]
    layers["norm1"] = {k: np.asarray(v, np.float32) for k, v in lp["attn_norm"].items()}
    if "mlp_norm" in lp:
        layers["norm2"] = {k: np.asarray(v, np.float32) for k, v in lp["mlp_norm"].items()}
    for u in geo.units:
        names = [s for s, _ in u.in_segs]
        mats = [segs[s][0] for s in names]
        if int8:
            qs = [_quantize_cols(w) for w in mats]  # per layer and output column: s [Y, g]
            layers[f"{u.name}_in"] = {"q": fuse([q for q, _ in qs], YZ, sub, 2),
                                      "s": fuse([s for _, s in qs], YZ, sub, 1)}
        else:
            layers[f"{u.name}_in"] = cast(fuse(mats, YZ, sub, 2))
        biases = [segs[s][1] for s in names]
        if any(b is not None for b in biases):
            biases = [b if b is not None else np.zeros(w.shape[::2], np.float32) for b, w in zip(biases, mats)]
            layers[f"{u.name}_bin"] = fuse(biases, YZ, 1, 1)
        outs = fuse([segs[s] for s, _ in u.mid_segs], YZ, sub, 1)
        if int8:
            q, s = _quantize_cols(outs)  # one scale per output column E, shared by all row segments
            layers[f"{u.name}_out"] = {"q": q, "s": s}
        else:
            layers[f"{u.name}_out"] = cast(outs)
        bout = []
        if u.has_attn and "bo" in lp:
            bout.append(np.asarray(lp["bo"], np.float32))
        if u.has_ffn and "b_out" in lp:
            bout.append(np.asarray(lp["b_out"], np.float32))
        if bout:
            layers[f"{u.name}_bout"] = sum(bout)
    tree = {"layers": layers, "final_norm": {k: np.asarray(v, np.float32) for k, v in params["final_norm"].items()}}
    V = cfg.vocab
    embed = np.zeros((geo.Vs, cfg.d_model), np.float32)
    embed[:V] = np.asarray(params["embed"], np.float32)
    tree["embed"] = quantize(embed, axis=0) if int8 else cast(embed)
    if "lm_head" in params:
        head = np.zeros((cfg.d_model, geo.Vs), np.float32)
        head[:, :V] = np.asarray(params["lm_head"], np.float32)
        tree["lm_head"] = quantize(head, axis=1) if int8 else cast(head)
    if "lm_head_bias" in params:
        b = np.zeros((geo.Vs,), np.float32)
        b[:V] = np.asarray(params["lm_head_bias"], np.float32)
        tree["lm_head_bias"] = b
    return tree


def _quantize_cols(w):
    """w [Y, R, C] -> (int8 [Y, R, C], scales [Y, C]): one scale per layer and output column."""
    out = [quantize(w[i], axis=-1) for i in range(w.shape[0])]
    return np.stack([o["q"] for o in out]), np.stack([o["s"] for o in out])
