"""The sharded model: every layout of the paper running under jax.shard_map on an (x, y, z) mesh,
equal to meshlm.reference and moving exactly the bytes meshlm.comm predicts.

API (same semantics as meshlm.reference, see notes in docs/layouts.md):

    sm = ShardedModel(cfg, MeshShape(2, 2, 2), devices=None, act_dtype=jnp.float32)
    params = sm.shard_params(canonical_params, weights="f32" | "bf16" | "int8", storage="2d" | "1d")
        # each stored leaf goes straight onto its shards (host numpy -> device_put with its
        # NamedSharding); "2d" (E_x F_yz) serves ws2d and every weight-gathered layout, ws1d needs
        # "1d" (E F_xyz). sm.param_specs(params) gives the PartitionSpec of every stored leaf.
    cache = sm.init_cache(layout, batch, max_len)      # {"k", "v"}: Y arrays [B, S, K_slots, D] each;
        # batch padded to comm.padded_batch
    logits, cache = sm.prefill(layout, params, tokens[B, L], lengths[B], cache, all_logits=False)
        # logits [B, V] at each prompt's last position (all_logits=True: [B, L, V]), replicated f32
    logits, cache = sm.decode(layout, params, cache, tokens[B], positions[B])   # logits [B, V]
    cache = sm.convert_cache(cache, to_layout)          # e.g. heads-prefill cache -> batch decode
    sm.cache_to_reference(cache, batch) / sm.cache_from_reference(ref_cache, layout)
    sm.lowered(layout, phase, params, ...)              # for HLO inspection (meshlm.hlo)

The cache's stored sharding belongs to the attention layout that reads it (comm.attention_axes):
prefill and decode may use different FFN layouts on the same cache whenever their attention
layouts agree; otherwise convert it explicitly (one resharding, done by XLA). Each (layout, phase,
shapes) is jit-compiled once; the cache is donated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshlm import comm, hugepages
from meshlm.errors import MeshlmError
from meshlm.layouts import Layout, MeshShape
from meshlm.mesh import make_mesh
from meshlm.quant import array_of, is_packed, packs
from meshlm.sharded_body import Body
from meshlm.sharded_params import Geometry, build_stored, pack_layers, per_layer, stored_specs

KV_DTYPES = {"f32": jnp.dtype(jnp.float32), "bf16": jnp.dtype(jnp.bfloat16)}  # layouts.KV_FORMATS -> dtype


def _spec_of(axes: str):
    return tuple(axes) if axes else None


class ShardedModel:
    def __init__(self, cfg, mesh_shape: MeshShape, devices=None, act_dtype=jnp.float32):
        self.cfg, self.mesh_shape = cfg, mesh_shape
        self.geo = Geometry(cfg, mesh_shape)
        self.mesh = make_mesh(mesh_shape, devices)
        self.act_dtype = act_dtype
        self._fns: dict = {}
        self.hugepages: dict | None = None  # what hugepages.advise did to the last params placed

    # ---- parameters ---------------------------------------------------------------------------
    def shard_params(self, params, weights: str = "f32", storage: str = "2d"):
        if weights not in ("f32", "bf16", "int8") or storage not in ("1d", "2d"):
            raise MeshlmError(f"weights must be f32|bf16|int8 and storage 1d|2d, got {weights!r}, {storage!r}")
        tree = build_stored(jax.tree.map(np.asarray, params), self.geo, weights, storage)
        tree, specs = per_layer(tree, stored_specs(self.geo, storage, weights == "int8", tree))
        if packs(weights, self.mesh_shape.n):
            tree, specs = pack_layers(tree, specs, self.geo)
        placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(self.mesh, s)), tree, specs)
        self.hugepages = hugepages.advise(placed)  # CPU weights on 2 MiB pages: a steadier stream
        return placed

    def param_specs(self, params):
        return jax.tree.map(lambda a: a.sharding.spec, params)

    def check_params(self, layout: Layout, params):
        u = self.geo.units[0].name
        w = params["layers"][0][f"{u}_in"]
        packed = is_packed(w)  # one device: 1d and 2d storage are the same arrays
        w = array_of(w)
        if not packed and (layout.ffn == "ws1d") != (w.sharding.spec[0] is None):
            need = "1d" if layout.ffn == "ws1d" else "2d"
            raise MeshlmError(f"layout {layout.ffn} needs params stored with storage={need!r}")
        fmt = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float32): "f32"}[w.dtype]
        if fmt != layout.weights:
            raise MeshlmError(f"layout says weights={layout.weights} but the params are {fmt}")
        if layout.mesh != self.mesh_shape:
            raise MeshlmError(f"layout mesh {layout.mesh} differs from the model's mesh {self.mesh_shape}")

    # ---- cache --------------------------------------------------------------------------------
    def cache_spec(self, layout: Layout):
        """PartitionSpec of one layer's cache array [B, S, K_slots, D]."""
        ba, ha = comm.attention_axes(layout)
        return P(_spec_of(ba), None, _spec_of(ha), None)

    def cache_heads(self, layout: Layout) -> int:
        return self.geo.Ks if layout.attention == "batch" else self.geo.Kx

    def init_cache(self, layout: Layout, batch: int, max_len: int, dtype=None):
        """One [B, S, K_slots, D] array per layer for K and for V: a step updates each layer's
        buffer in place (a stacked [Y, ...] cache had each layer's slice copied in and out). Its
        dtype: `dtype`, else the layout's KV format, else the activations'."""
        B = comm.padded_batch(batch, layout)
        shape = (B, max_len, self.cache_heads(layout), self.cfg.d_head)
        spec, dt = self.cache_spec(layout), self.cache_dtype(layout, dtype)
        key = ("zeros", shape, spec, dt)
        if key not in self._fns:  # kept: a new jit per call would compile on every prefill (~80 ms)
            sh = NamedSharding(self.mesh, spec)
            Y = self.cfg.n_layers
            self._fns[key] = jax.jit(lambda: {n: tuple(jnp.zeros(shape, dt) for _ in range(Y)) for n in "kv"},
                                     out_shardings={n: (sh,) * Y for n in "kv"})
        return self._fns[key]()  # one dispatch for all 2Y arrays

    @staticmethod
    def cache_shape(cache) -> tuple[int, int, int, int]:
        """(B, S, K_slots, D) of a cache (each layer's array)."""
        return tuple(cache["k"][0].shape)

    def _cache_specs(self, layout: Layout):
        Y = self.cfg.n_layers
        return {n: tuple(self.cache_spec(layout) for _ in range(Y)) for n in ("k", "v")}

    def _check_cache(self, layout: Layout, cache):
        k = cache["k"][0]
        want = NamedSharding(self.mesh, self.cache_spec(layout))
        if len(cache["k"]) != self.cfg.n_layers or k.ndim != 4:
            raise MeshlmError(f"the cache must hold one [B, S, K, D] array per layer ({self.cfg.n_layers}); "
                              f"make it with init_cache")
        if k.shape[2] != self.cache_heads(layout) or not k.sharding.is_equivalent_to(want, k.ndim):
            raise MeshlmError(f"the cache is not laid out for {layout.short} attention on {layout.mesh}; "
                              f"convert it with convert_cache")
        if k.shape[0] % comm.batch_multiple(layout):
            raise MeshlmError(f"cache batch {k.shape[0]} is not a multiple of {comm.batch_multiple(layout)} "
                              f"needed by {layout.short}")

    def cache_dtype(self, layout: Layout, dtype=None):
        """A cache's dtype: `dtype` when given, else the layout's KV format, else the activations'."""
        return jnp.dtype(dtype or KV_DTYPES.get(layout.kv_cache) or self.act_dtype)

    def cache_from_reference(self, ref_cache, layout: Layout, dtype=None):
        """A canonical cache [Y, B, S, K, D] laid out for `layout` (batch and heads padded)."""
        B = comm.padded_batch(ref_cache["k"].shape[1], layout)
        idx = self.geo.kv_map(self.cache_heads(layout))
        out = {}
        for n, a in ref_cache.items():
            a = np.asarray(a)
            a = np.concatenate([a, np.zeros((a.shape[0], B - a.shape[1], *a.shape[2:]), a.dtype)], axis=1)
            pad = np.zeros_like(a[:, :, :, :1])
            a = np.concatenate([a, pad], axis=3)[:, :, :, np.where(idx < 0, a.shape[3], idx)]
            sh = NamedSharding(self.mesh, self.cache_spec(layout))
            out[n] = tuple(jax.device_put(a[i].astype(self.cache_dtype(layout, dtype)), sh) for i in range(a.shape[0]))
        return out

    def cache_to_reference(self, cache, batch: int):
        """The canonical [Y, batch, S, K, D] view of a sharded cache (numpy)."""
        out = {}
        for n, layers in cache.items():
            a = np.stack([np.asarray(x) for x in layers])
            idx = self.geo.kv_map(a.shape[3])
            first = [int(np.where(idx == h)[0][0]) for h in range(self.cfg.n_kv_heads)]
            out[n] = a[:, :batch][:, :, :, first]
        return out

    def convert_cache(self, cache, to: Layout):
        """Re-lay a cache for another attention layout (select or replicate KV slots, reshard)."""
        B, _, src, _ = self.cache_shape(cache)
        dst = self.cache_heads(to)
        sel = self.geo.kv_map(src)
        want = self.geo.kv_map(dst)
        idx = np.array([int(np.flatnonzero(sel == h)[0]) for h in want])  # padding maps to padding
        if B % comm.batch_multiple(to):
            raise MeshlmError(f"cache batch {B} does not split for {to.short}")
        key = ("convert", src, self.cache_spec(to), dst)
        if key not in self._fns:  # one jit per (source slots, target layout); traced per shape
            shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self._cache_specs(to),
                                     is_leaf=lambda s: isinstance(s, P))
            self._fns[key] = jax.jit(lambda c: jax.tree.map(lambda a: jnp.take(a, jnp.asarray(idx), axis=2), c),
                                     out_shardings=shardings)
        return self._fns[key](cache)

    # ---- the passes ---------------------------------------------------------------------------
    def pass_fn(self, layout: Layout, phase: str, all_logits: bool, params):
        """The jitted pass (params, tokens [Bc, L], rows [Bc], cache) -> (logits, cache) on the
        cache's full batch Bc, cached per (layout, phase, params structure). The engine traces it
        inside its own jitted step, so sampling runs in the same program."""
        key = (layout, phase, all_logits, jax.tree.structure(params))
        if key not in self._fns:
            body = Body(self.geo, layout, phase, all_logits, self.act_dtype)
            pspecs = self.param_specs(params)
            cspec = self._cache_specs(layout)
            V = self.cfg.vocab

            def run(params, tokens, rows, cache):
                return body.forward(params, tokens, rows, cache)

            sm = jax.shard_map(run, mesh=self.mesh, in_specs=(pspecs, P(), P(), cspec),
                               out_specs=(P(), cspec), check_vma=False)

            def full(params, tokens, rows, cache):
                logits, cache = sm(params, tokens, rows, cache)
                return logits[..., :V], cache

            self._fns[key] = jax.jit(full, donate_argnums=(3,))
        return self._fns[key]

    def _pad_rows(self, layout: Layout, cache, *arrays):
        Bc = self.cache_shape(cache)[0]
        B = arrays[0].shape[0]
        if B > Bc:
            raise MeshlmError(f"batch {B} exceeds the cache's {Bc} rows")
        out = []
        for a in arrays:
            a = jnp.asarray(a, jnp.int32)
            out.append(jnp.concatenate([a, jnp.zeros((Bc - B, *a.shape[1:]), jnp.int32)]) if Bc > B else a)
        return B, out

    def prefill(self, layout: Layout, params, tokens, lengths, cache, all_logits: bool = False):
        self._check(layout, params, cache)
        if tokens.shape[1] > self.cache_shape(cache)[1]:
            raise MeshlmError(f"prompt length {tokens.shape[1]} exceeds the cache length {self.cache_shape(cache)[1]}")
        B, (tok, lens) = self._pad_rows(layout, cache, tokens, lengths)
        logits, cache = self.pass_fn(layout, "prefill", all_logits, params)(params, tok, lens, cache)
        return (logits[:B] if all_logits else logits[:B, 0]), cache

    def decode(self, layout: Layout, params, cache, tokens, positions):
        self._check(layout, params, cache)
        B, (tok, pos) = self._pad_rows(layout, cache, tokens, positions)
        logits, cache = self.pass_fn(layout, "decode", False, params)(params, tok[:, None], pos, cache)
        return logits[:B, 0], cache

    def _check(self, layout, params, cache):
        self.check_params(layout, params)
        self._check_cache(layout, cache)

    def lowered(self, layout: Layout, phase: str, params, tokens, rows, cache, all_logits: bool = False):
        """The jit-lowered pass on padded inputs (tokens [Bc, L], rows [Bc]), for HLO inspection."""
        self._check(layout, params, cache)
        return self.pass_fn(layout, phase, all_logits, params).lower(params, tokens, rows, cache)

    # ---- bytes on device ----------------------------------------------------------------------
    @staticmethod
    def bytes_per_device(tree) -> int:
        """Bytes of a tree of sharded arrays held by one device (the first), read from the shardings."""
        total = 0
        for a in jax.tree.leaves(tree):
            shard = a.sharding.shard_shape(a.shape)
            total += math.prod(shard) * a.dtype.itemsize
        return total



