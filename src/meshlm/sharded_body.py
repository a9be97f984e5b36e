"""The shard_map body of one layout: a whole forward pass (embedding, scanned layers, logits) from
one device's point of view, with exactly the collectives meshlm.comm lists (docs/layouts.md draws
them). Built by meshlm.sharded; nothing here is public API.

Shapes are per device. Bl: local batch rows of the residual; E_r: local E of the residual;
E_l: local E after the activation all-gather; N: column blocks held after the weight gather;
Cb: columns of one block.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from meshlm import comm, kernels
from meshlm.collectives import (ag_matmul, all_gather, all_to_all, gather_blocks, group_index, local_slice,
                                matmul_rs, psum, reduce_scatter)
from meshlm.layouts import Layout, parse_spec
from meshlm.model import act, apply_norm, attend_causal, attend_one, norm_stats, rope_table, rotary
from meshlm.quant import KERNEL_MAX_M, dot_rows, dot_t, is_packed, is_quantized
from meshlm.sharded_params import Geometry

ZY = ("z", "y")


def _sorted(axes):
    return tuple(a for a in "xyz" if a in axes)


class Body:
    def __init__(self, geo: Geometry, layout: Layout, phase: str, all_logits: bool, act_dtype):
        m, p = layout.mesh, layout.plan
        self.geo, self.cfg, self.layout, self.m = geo, geo.cfg, layout, m
        self.phase, self.all_logits, self.dt = phase, all_logits, act_dtype
        self.attend_phase = self.attend_prefill if phase == "prefill" else self.attend_decode

        def live(axes):
            return tuple(a for a in axes if m.size(a) > 1)

        self.ag, self.ea, self.ba = live(p.act_gather), live(p.e_axes), live(p.batch_axes)
        self.resid_e = live(dict(parse_spec(p.resid))["E"])
        wg = live(p.weight_gather)
        self.wg_e = ("x",) if "x" in wg else ()
        self.wg_c = tuple(a for a in ZY if a in wg)
        self.nblk = m.size("".join(self.wg_c))
        self.gathers_weights = bool(self.wg_e or self.wg_c)
        self.split_x = layout.ffn in ("ws1d", "ws2d")  # F blocks further split over x after the input
        self.cm = layout.collective_matmul
        self.att_ba = live(comm.attention_axes(layout)[0])
        self.proj_ha = live(comm.proj_head_axes(layout))  # heads split after the input projection
        self.all = live("xyz")
        self.E = geo.cfg.d_model
        self.E_r = self.E // m.size(dict(parse_spec(p.resid))["E"])
        self.E_l = self.E // m.size(p.e_axes)

    # ---- column bookkeeping (biases and int8 scales are replicated in the 2D column order) -----
    def _blocks(self, v):
        """v [C] (2D column order) -> the column blocks this device multiplies: [N, Cb]."""
        m = self.m
        v = v.reshape(m.z, m.y, -1)
        for i, a in enumerate(ZY):
            if a not in self.wg_c:
                v = lax.dynamic_index_in_dim(v, lax.axis_index(a), axis=i, keepdims=True)
        return v.reshape(self.nblk, -1)

    def _split_x(self, v, segs, axis: int = -1):
        """Blocks [.., Cb] of segments (sizes per block) -> [.., X, Cb/X]: each segment split over x."""
        X = self.m.x
        parts, o = [], 0
        for g in segs:
            piece = lax.slice_in_dim(v, o, o + g, axis=axis)
            parts.append(piece.reshape(*piece.shape[:-1], X, g // X))
            o += g
        return jnp.concatenate(parts, axis=-1)

    def post_cols(self, v, segs):
        b = self._blocks(v)
        if not self.split_x:
            return b
        return lax.dynamic_index_in_dim(self._split_x(b, segs), lax.axis_index("x"), axis=1, keepdims=False)

    # ---- weights ----------------------------------------------------------------------------
    # int8 scales ride in the weight's one all-gather as 4 extra int8 rows (their f32 bits).
    def gather_in(self, w):
        """Stored block [E_s, Cb] (int8: + scales [Cb]) -> ([E_l, N, Cb], scales [N, Cb] or None).
        Packed (one device): the packed weight [C/64, E, 64] as stored, scales [1, C]."""
        if is_packed(w):
            return w["p"], (w["s"][None] if is_quantized(w) else None)
        q, s = (w["q"], w["s"]) if is_quantized(w) else (w, None)
        if not (self.wg_e or self.wg_c):
            return q[:, None, :], (None if s is None else s[None])
        nx, nc, Es = self.m.size("".join(self.wg_e)), self.nblk, q.shape[0]
        if s is not None:
            q = jnp.concatenate([q, lax.bitcast_convert_type(s, jnp.int8).T], axis=0)
        g = gather_blocks(q, self.wg_e + self.wg_c, 0).reshape(nx, nc, *q.shape)
        wq = g[:, :, :Es].transpose(0, 2, 1, 3).reshape(nx * Es, nc, q.shape[1])
        if s is None:
            return wq, None
        return wq, lax.bitcast_convert_type(g[0, :, Es:].transpose(0, 2, 1), jnp.float32)

    def gather_out(self, w):
        """Stored block [Cmb, E_s] (int8: + scales [E_s]) -> ([N * Cmb, E_o], scales [E_o] or None).
        Packed (one device): the packed weight [E/64, Cm, 64] as stored."""
        if is_packed(w):
            return w["p"], w.get("s")
        q, s = (w["q"], w["s"]) if is_quantized(w) else (w, None)
        if not (self.wg_e or self.wg_c):
            return q, s
        nx, nc, Cmb = self.m.size("".join(self.wg_e)), self.nblk, q.shape[0]
        if s is not None:
            q = jnp.concatenate([q, lax.bitcast_convert_type(s, jnp.int8).T], axis=0)
        g = gather_blocks(q, self.wg_e + self.wg_c, 0).reshape(nx, nc, *q.shape)
        wq = g[:, :, :Cmb].transpose(1, 2, 0, 3).reshape(nc * Cmb, nx * q.shape[1])
        if s is None:
            return wq, None
        return wq, lax.bitcast_convert_type(g[:, 0, Cmb:].transpose(0, 2, 1), jnp.float32).reshape(-1)

    # ---- one unit (parallel block, or the attention / FFN half of a serial block) ---------------
    def _div(self, post: bool) -> int:
        m = self.m
        if self.layout.ffn == "ws1d" or (post and self.split_x):
            return m.n
        return m.y * m.z

    def unit(self, u, x, lw, cache, rows):
        cfg, E = self.cfg, self.E
        rms = cfg.norm == "rmsnorm"
        seg_pre = [g // self._div(False) for _, g in u.in_segs]
        seg_2d = [g // (self.m.y * self.m.z) for _, g in u.in_segs]  # block sizes of biases/scales
        seg_post = [g // self._div(True) for _, g in u.in_segs]
        nf = sum(g for s, g in zip([s for s, _ in u.in_segs], seg_pre) if s in ("gate", "up", "in"))
        if u.name == "block" and cfg.parallel_norms == 2:
            groups = [("norm2", 0, nf), ("norm1", nf, sum(seg_pre))]
        else:
            groups = [("norm2" if u.name == "ffn" else "norm1", 0, sum(seg_pre))]
        packed_in = is_packed(lw[f"{u.name}_in"])  # one device, one norm group: the whole weight at once
        Wg, s_in = self.gather_in(lw[f"{u.name}_in"])
        Bl, L = x.shape[0], x.shape[1]
        M = Bl * L

        if self.cm and self.ag:
            stats = psum(norm_stats(x, rms), self.resid_e)
            e0 = group_index(self.ea) * self.E_l
        else:
            xg = all_gather(x, self.ag, axis=2)
            stats = psum(norm_stats(xg, rms), self.ea)
            e0 = group_index(self.ea) * self.E_l

        def chunk_mm(xc, c):
            Ec = xc.shape[-1]
            outs = []
            for key, lo, hi in groups:
                p = {k: lax.dynamic_slice_in_dim(v, e0 + c * Ec, Ec) for k, v in lw[key].items()}
                xn = apply_norm(xc, stats, E, p, rms, cfg.norm_eps).reshape(M, Ec)
                rows = Wg if packed_in else lax.dynamic_slice_in_dim(Wg[:, :, lo:hi], c * Ec, Ec, axis=0).reshape(Ec, -1)
                outs.append(dot_rows(xn, rows, self.dt).reshape(M, self.nblk, hi - lo))
            return jnp.concatenate(outs, axis=-1)

        y = ag_matmul(x, self.ag, chunk_mm) if (self.cm and self.ag) else chunk_mm(xg, 0)
        if s_in is not None:
            y = (y * s_in).astype(self.dt)
        if self.layout.ffn == "ws2d" and self.ea:  # partial sums over x -> F_zyx (onto the hidden dim)
            y = lax.psum_scatter(self._split_x(y[:, 0], seg_pre), self.ea, scatter_dimension=1, tiled=False)[:, None]
        if f"{u.name}_bin" in lw:
            y = y + self.post_cols(lw[f"{u.name}_bin"], seg_2d).astype(self.dt)
        seg, o = {}, 0
        for (name, _), g in zip(u.in_segs, seg_post):
            seg[name] = y[..., o:o + g]
            o += g
        mids = []
        if u.has_ffn:
            h = act(seg["gate"], cfg.activation) * seg["up"] if cfg.gated_mlp else act(seg["in"], cfg.activation)
            mids.append(h)
        if u.has_attn:
            D = cfg.d_head
            q = seg["q"].reshape(Bl, L, -1, D)
            k, v = seg["k"].reshape(Bl, L, -1, D), seg["v"].reshape(Bl, L, -1, D)
            o_, cache = self.attention(q, k, v, cache, rows)
            mids.append(o_.reshape(M, self.nblk, -1))
        mid = jnp.concatenate([t.reshape(M, self.nblk, -1) for t in mids], axis=-1)
        mid_post = [g // self._div(True) for _, g in u.mid_segs]
        if self.layout.ffn == "ws2d" and self.ea:
            gm = lax.all_gather(mid[:, 0], self.ea, axis=1, tiled=False)  # [M, X, Cm/n]
            parts, o = [], 0
            for g in mid_post:
                parts.append(gm[:, :, o:o + g].reshape(M, -1))
                o += g
            mid = jnp.concatenate(parts, axis=-1)[:, None]
        packed_out = is_packed(lw[f"{u.name}_out"])
        Wog, so = self.gather_out(lw[f"{u.name}_out"])
        mid = mid.reshape(M, -1)

        def out_mm(c):
            if packed_out:  # one device: all E columns
                Ec, cols = self.E, Wog
            else:
                Ec = self.E_r if (self.cm and self.ag) else Wog.shape[-1]
                cols = lax.dynamic_slice_in_dim(Wog, c * Ec, Ec, axis=1)
            r = dot_rows(mid, cols, self.dt)
            if so is not None:
                r = (r * lax.dynamic_slice_in_dim(so, c * Ec, Ec)).astype(self.dt)
            return r

        if self.cm and self.ag:
            out = matmul_rs(self.ag, out_mm)
        else:
            out = reduce_scatter(out_mm(0), self.ag, axis=1)
        if f"{u.name}_bout" in lw:
            out = out + local_slice(lw[f"{u.name}_bout"], self.resid_e, 0).astype(self.dt)
        return x + out.reshape(Bl, L, -1), cache

    # ---- attention --------------------------------------------------------------------------
    def attention(self, q, k, v, cache, rows):
        """q [Bl, L, Hl, D], k, v [Bl, L, Kl, D] in the projection layout -> (o [Bl, L, Hl, D], cache).

        Batch layout: one all-to-all to B_xyz (heads whole) and one back (Fig. 5b); heads layout
        attends in place. The phase's own function (prefill / decode) does the rest."""
        g = self.geo
        batch = self.layout.attention == "batch"
        ha = self.proj_ha if batch else ()
        L, Hl, D = q.shape[1], q.shape[2], q.shape[3]
        Kl = k.shape[2]
        if ha:
            srt = _sorted(ha)
            t = all_to_all(jnp.concatenate([q, k, v], axis=2), srt, 0, 2)  # [b, L, k*(Hl+2Kl), D]
            b = t.shape[0]
            t = t.reshape(b, L, *[self.m.size(a) for a in srt], Hl + 2 * Kl, D)
            # received in device (x, y, z) order; heads are ordered by the projection's axes
            t = t.transpose(0, 1, *[2 + srt.index(a) for a in ha], *range(2 + len(srt), t.ndim))
            t = t.reshape(b, L, -1, Hl + 2 * Kl, D)
            q = t[:, :, :, :Hl].reshape(b, L, -1, D)
            k = t[:, :, :, Hl:Hl + Kl].reshape(b, L, -1, D)
            v = t[:, :, :, Hl + Kl:].reshape(b, L, -1, D)
        if batch:  # keep one copy of each KV head out of the replicated slots
            r = g.Kx // g.Ks
            k, v = k[:, :, ::r], v[:, :, ::r]
        o, cache = self.attend_phase(q, k, v, cache, local_slice(rows, self.att_ba, 0))
        if ha:
            b = o.shape[0]
            o = o.reshape(b, L, *[self.m.size(a) for a in ha], Hl, D)
            o = o.transpose(0, 1, *[2 + ha.index(a) for a in srt], *range(2 + len(ha), o.ndim)).reshape(b, L, -1, D)
            o = all_to_all(o, srt, 2, 0)
        return o, cache

    def _rope(self, x, pos):
        c = self.cfg
        return rotary(x, pos, c.rot_dim, c.rope_theta, c.rope_style)

    def attend_prefill(self, q, k, v, cache, lengths):
        """Prompts at positions 0..L-1 attend among themselves; K/V of positions < length are
        written to the cache."""
        b, L = q.shape[0], q.shape[1]
        ck, cv = cache
        pos = jnp.broadcast_to(jnp.arange(L)[None], (b, L))
        q, k = self._rope(q, pos), self._rope(k, pos)
        valid = (pos < lengths[:, None])[:, :, None, None]
        ck = lax.dynamic_update_slice_in_dim(ck, jnp.where(valid, k.astype(ck.dtype), ck[:, :L]), 0, axis=1)
        cv = lax.dynamic_update_slice_in_dim(cv, jnp.where(valid, v.astype(cv.dtype), cv[:, :L]), 0, axis=1)
        o = attend_causal(q.reshape(b, L, k.shape[2], -1, q.shape[3]), k, v, lengths)
        return o.reshape(q.shape), (ck, cv)

    def attend_decode(self, q, k, v, cache, positions):
        """One token per sequence at positions[b]: written to the cache, attends to positions <= it."""
        b = q.shape[0]
        ck, cv = cache
        pos = positions[:, None]
        q, k = self._rope(q, pos), self._rope(k, pos)
        bi = jnp.arange(b)
        ck = ck.at[bi, positions].set(k[:, 0].astype(ck.dtype), mode="drop")
        cv = cv.at[bi, positions].set(v[:, 0].astype(cv.dtype), mode="drop")
        o = attend_one(q.reshape(b, ck.shape[2], -1, q.shape[3]), ck, cv, positions)
        return o.reshape(q.shape), (ck, cv)

    # ---- embedding, layers, logits ------------------------------------------------------------
    def embed(self, tokens, table):
        """tokens [B, L] (replicated) -> residual [Bl, L, E_r] via one reduce-scatter(xyz)."""
        m, p = self.m, self.layout.plan
        if is_packed(table):  # one device, the tied table packed as [V/64, E, 64]: row v is a column
            pk = table["p"]
            Vl = pk.shape[0] * pk.shape[2]
        else:
            q = table["q"] if is_quantized(table) else table
            Vl = q.shape[0]
        v0 = group_index(("x", "y", "z")) * Vl
        idx = tokens - v0
        hit = (idx >= 0) & (idx < Vl)
        ci = jnp.clip(idx, 0, Vl - 1)
        if is_packed(table):
            rows = pk[ci // pk.shape[2], :, ci % pk.shape[2]].astype(self.dt)  # [B, L, E]
        else:
            rows = jnp.take(q, ci, axis=0).astype(self.dt)
        if is_quantized(table):
            rows = rows * table["s"][ci][..., None].astype(self.dt)
        rows = jnp.where(hit[..., None], rows, 0)
        B, L = tokens.shape
        nb = m.size(p.batch_axes)
        ne = m.size(dict(parse_spec(p.resid))["E"])
        rows = rows.reshape(nb, B // nb, L, ne, self.E_r).transpose(0, 3, 1, 2, 4).reshape(m.n, B // nb, L, self.E_r)
        if not self.all:
            return rows[0]
        return lax.psum_scatter(rows, self.all, scatter_dimension=0, tiled=False)

    def logits(self, x, params, lengths):
        m, p, cfg = self.m, self.layout.plan, self.cfg
        if self.phase == "prefill" and not self.all_logits:
            idx = jnp.clip(local_slice(lengths, self.ba, 0) - 1, 0, x.shape[1] - 1)
            x = jnp.take_along_axis(x, idx[:, None, None], axis=1)
        Bl, Lo = x.shape[0], x.shape[1]
        nb = m.size(p.batch_axes)
        ne = m.size(dict(parse_spec(p.resid))["E"])
        g = lax.all_gather(x, self.all, axis=0, tiled=False) if self.all else x[None]
        h = g.reshape(nb, ne, Bl, Lo, self.E_r).transpose(0, 2, 3, 1, 4).reshape(nb * Bl, Lo, self.E)
        stats = norm_stats(h, cfg.norm == "rmsnorm")
        h = apply_norm(h, stats, self.E, params["final_norm"], cfg.norm == "rmsnorm", cfg.norm_eps)
        h = h.reshape(-1, self.E).astype(jnp.float32)
        w = params["lm_head"] if "lm_head" in params else params["embed"]
        if is_packed(w):  # one device: [E, V] packed either way, the int8 scales applied in the kernel
            out = dot_rows(h, w["p"], jnp.float32, scale=w.get("s"))
        else:
            if "lm_head" in params:
                out = dot_rows(h, w["q"] if is_quantized(w) else w, jnp.float32)
            else:  # tied: the embedding [V, E] read as stored (chunked over V when int8)
                out = dot_t(h, w["q"] if is_quantized(w) else w, jnp.float32)
            if is_quantized(w):
                out = out * w["s"]
        if "lm_head_bias" in params:
            out = out + params["lm_head_bias"]
        out = out.reshape(nb * Bl, Lo, -1)
        return all_gather(out, self.all, axis=2)

    def fused(self, params, cache) -> bool:
        """Whether this pass runs each layer as one CPU kernel call (kernels.decoder_layer): a
        decode step of a Llama-style model (serial block, RMSNorm, gated SiLU, no biases) on one
        device, weights packed (int8 or f32), f32 activations, an f32 or bf16 cache, at most KERNEL_MAX_M rows."""
        cfg, g, lw, ck = self.cfg, self.geo, params["layers"][0], cache["k"][0]
        return (self.phase == "decode" and self.m.n == 1 and kernels.enabled() and self.dt == jnp.float32
                and cfg.block == "serial" and cfg.norm == "rmsnorm" and cfg.gated_mlp and cfg.activation == "silu"
                and set(lw) == {"norm1", "norm2", "attn_in", "attn_out", "ffn_in", "ffn_out"}
                and all(set(lw[n]) == {"scale"} for n in ("norm1", "norm2"))
                and all(is_packed(lw[n]) for n in ("attn_in", "attn_out", "ffn_in", "ffn_out"))
                and ck.dtype in kernels.CACHE_DTYPES and ck.shape[2] == g.Kx == g.Ks and ck.shape[0] <= KERNEL_MAX_M)

    def fused_layers(self, x, params, positions, cache):
        """The decode layers through kernels.decoder_layer: x [B, 1, E] -> (x, k caches, v caches)."""
        cfg = self.cfg
        cos, sin = rope_table(positions, cfg.rot_dim, cfg.rope_theta)  # [B, R/2], shared by all layers
        h, ks, vs = x[:, 0], [], []
        for lw, ck, cv in zip(params["layers"], cache["k"], cache["v"]):
            w = {"norm1": lw["norm1"]["scale"], "norm2": lw["norm2"]["scale"], "qkv": lw["attn_in"],
                 "o": lw["attn_out"], "gu": lw["ffn_in"], "d": lw["ffn_out"]}
            h, ck, cv = kernels.decoder_layer(h, positions, cos, sin, w, ck, cv, cfg.norm_eps, cfg.rope_style == "half")
            ks.append(ck)
            vs.append(cv)
        return h[:, None], ks, vs

    def forward(self, params, tokens, rows, cache):
        """The whole pass. rows: lengths [B] (prefill) or positions [B] (decode), replicated."""
        x = self.embed(tokens, params["embed"])
        if self.fused(params, cache):
            x, ks, vs = self.fused_layers(x, params, rows, cache)
            return self.logits(x, params, rows), {"k": tuple(ks), "v": tuple(vs)}
        ks, vs = [], []
        # Layers unrolled over per-layer weight and cache leaves: XLA:CPU copies a layer's slice out
        # of a stacked [Y, ...] array (in a scan or not) before using it; separate buffers are read
        # in place, and the donated cache arrays are updated in place (only the new rows written).
        layers = list(params["layers"])
        for i, (ck, cv) in enumerate(zip(cache["k"], cache["v"])):
            if self.gathers_weights and i + 1 < len(layers):
                # The next layer's weights wait for this layer's input: its gathers overlap this
                # layer (§3.5) and at most two layers' gathered weights are live. Unordered,
                # XLA:CPU issued every layer's gathers up front: a 6-token generate of the real model
                # on 2x2x2 under wg-xyz/heads peaked at 10.5 GB of RSS, ordered at 6.5 GB.
                x, layers[i + 1] = lax.optimization_barrier((x, layers[i + 1]))
            lw, c = layers[i], (ck, cv)
            for u in self.geo.units:
                if u.has_attn:
                    x, c = self.unit(u, x, lw, c, rows)
                else:
                    x, _ = self.unit(u, x, lw, None, rows)
            ks.append(c[0])
            vs.append(c[1])
        return self.logits(x, params, rows), {"k": tuple(ks), "v": tuple(vs)}
