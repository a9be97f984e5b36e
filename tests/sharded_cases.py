"""Shared helpers for the sharded-model tests: one reference run per model, and one check of a
layout (each phase compiled once: outputs, cache and HLO bytes) via meshlm.sharded_verify."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import reference as ref
from meshlm.layouts import Layout
from meshlm.sharded_verify import Workload, reference_results, run_layout

B, L, S = 8, 6, 16
TOL = 1e-4  # f32, activations and logits of order 1-10


def inputs(cfg, batch=B):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, L), 0, cfg.vocab, dtype=jnp.int32)
    lengths = jnp.array([6, 5, 4, 6, 3, 6, 1, 2, 6, 2, 5][:batch], jnp.int32)
    dtok = (jnp.arange(batch, dtype=jnp.int32) * 7 + 3) % cfg.vocab
    return tokens, lengths, dtok


def workload(cfg, batch=B):
    tokens, lengths, dtok = inputs(cfg, batch)
    return Workload(np.asarray(tokens), np.asarray(lengths), np.asarray(dtok), S)


@functools.lru_cache(maxsize=None)
def reference_run(cfg, batch=B):
    """(params, prefill logits, cache after prefill, decode logits, cache after decode)."""
    params = ref.init_params(cfg, jax.random.PRNGKey(0))
    e = reference_results(cfg, params, workload(cfg, batch))
    return params, e.prefill_logits, e.prefill_cache, e.decode_logits, e.decode_cache


@functools.lru_cache(maxsize=None)
def _expected(cfg, batch):
    return reference_results(cfg, reference_run(cfg, batch)[0], workload(cfg, batch))


def check_layout(sm, params_by_storage, layout: Layout, batch=B, tol=TOL, act_bytes=4, params=None):
    """Run prefill then decode of `layout`; return a list of failure messages (empty: all good).

    Checks: logits and cache equal the reference (run on `params`, default the model's random
    params); HLO bytes and number of collectives per kind equal comm's, exactly."""
    cfg = sm.cfg
    w = workload(cfg, batch)
    expected = _expected(cfg, batch) if params is None else reference_results(cfg, params, w)
    stored = params_by_storage["1d" if layout.ffn == "ws1d" else "2d"]
    errs = []
    for r in run_layout(sm, stored, layout, w, expected, act_bytes=act_bytes):
        if not r.bytes_match:
            errs.append(f"{layout} {r.phase}: HLO bytes {r.measured_bytes} != predicted {r.predicted_bytes}")
        if not r.counts_match:
            errs.append(f"{layout} {r.phase}: HLO collectives {r.measured_counts} != predicted {r.predicted_counts}")
        if not (r.max_abs_error <= tol and r.cache_error <= tol):
            errs.append(f"{layout} {r.phase}: max abs error logits {r.max_abs_error:.2e}, cache {r.cache_error:.2e}")
    return errs
