"""Shared fixtures-by-function for the sharded-model tests: one reference run per model, and one
check of a layout (compiled once per phase: outputs, cache and HLO bytes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import comm, hlo
from meshlm import reference as ref
from meshlm.layouts import Layout

B, L, S = 8, 6, 16
TOL = 1e-4  # f32, activations and logits of order 1


def inputs(cfg, batch=B):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, L), 0, cfg.vocab, dtype=jnp.int32)
    lengths = jnp.array([6, 5, 4, 6, 3, 6, 1, 2, 6, 2, 5][:batch], jnp.int32)
    dtok = (jnp.arange(batch, dtype=jnp.int32) * 7 + 3) % cfg.vocab
    return tokens, lengths, dtok


@functools.lru_cache(maxsize=None)
def reference_run(cfg, batch=B):
    """(params, prefill logits, cache after prefill, decode logits, cache after decode)."""
    params = ref.init_params(cfg, jax.random.PRNGKey(0))
    tokens, lengths, dtok = inputs(cfg, batch)
    lg, c1 = ref.prefill(params, cfg, tokens, lengths, ref.init_cache(cfg, batch, S))
    dl, c2 = ref.decode(params, cfg, c1, dtok, lengths)
    return params, np.asarray(lg), jax.tree.map(np.asarray, c1), np.asarray(dl), jax.tree.map(np.asarray, c2)


def pad_rows(a, n):
    a = np.asarray(a)
    return jnp.asarray(np.concatenate([a, np.zeros((n - a.shape[0], *a.shape[1:]), a.dtype)]))


def check_layout(sm, params_by_storage, layout: Layout, batch=B, tol=TOL, act_bytes=4):
    """Run prefill then decode of `layout`; return a list of failure messages (empty: all good).

    Checks: logits and cache equal the reference; HLO bytes per collective kind equal comm's."""
    cfg = sm.cfg
    params, rl, rc1, rdl, rc2 = reference_run(cfg, batch)
    tokens, lengths, dtok = inputs(cfg, batch)
    ps = params_by_storage["1d" if layout.ffn == "ws1d" else "2d"]
    cache = sm.init_cache(layout, batch, S)
    Bc = cache["k"].shape[1]
    errs = []
    valid = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
    for phase, args in (("prefill", (pad_rows(tokens, Bc), pad_rows(lengths, Bc))),
                        ("decode", (pad_rows(dtok, Bc)[:, None], pad_rows(lengths, Bc)))):
        compiled = sm.lowered(layout, phase, ps, *args, cache, all_logits=True).compile()
        got = hlo.totals(compiled.as_text())
        want = comm.totals(comm.forward_collectives(cfg, layout, phase, batch, L if phase == "prefill" else 1, S,
                                                    act_bytes=act_bytes, all_logits=True))
        if got != want:
            errs.append(f"{layout} {phase}: HLO bytes {got} != predicted {want}")
        logits, cache = compiled(ps, *args, cache)
        logits = np.asarray(logits)[:batch]
        rc = rc1 if phase == "prefill" else rc2
        if phase == "prefill":
            e = float(np.max(np.where(valid[..., None], np.abs(logits - rl), 0)))
        else:
            e = float(np.max(np.abs(logits[:, 0] - rdl)))
        got_c = sm.cache_to_reference(cache, batch)
        ce = max(float(np.max(np.abs(got_c[n] - rc[n]))) for n in ("k", "v"))
        if not (e <= tol and ce <= tol):
            errs.append(f"{layout} {phase}: max abs error logits {e:.2e}, cache {ce:.2e}")
    return errs
