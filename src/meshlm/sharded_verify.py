"""Run one layout against the reference and the cost model's inventory: the one routine behind
`meshlm layouts`, benchmarks/layouts.py and the layout tests.

For each phase (prefill of L tokens with all logits, then one decode step on the cache it wrote)
it compiles the sharded pass once, reads the collective bytes from the compiled HLO, runs it,
and compares logits (valid positions) and the KV cache with the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import comm, hlo
from meshlm import reference as ref
from meshlm.layouts import Layout


@dataclass
class Workload:
    tokens: np.ndarray  # [B, L] right-padded prompts
    lengths: np.ndarray  # [B]
    next_tokens: np.ndarray  # [B] the decode step's tokens (at position lengths[b])
    cache_len: int

    @classmethod
    def random(cls, cfg, batch: int, q_len: int, cache_len: int, seed: int = 1) -> "Workload":
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, q_len + 1, size=batch).astype(np.int32)
        lengths[0] = q_len
        return cls(rng.integers(0, cfg.vocab, size=(batch, q_len)).astype(np.int32), lengths,
                   rng.integers(0, cfg.vocab, size=batch).astype(np.int32), cache_len)


@dataclass
class Expected:
    prefill_logits: np.ndarray
    prefill_cache: dict
    decode_logits: np.ndarray
    decode_cache: dict


def reference_results(cfg, params, w: Workload) -> Expected:
    B = w.tokens.shape[0]
    lg, c1 = ref.prefill(params, cfg, jnp.asarray(w.tokens), jnp.asarray(w.lengths), ref.init_cache(cfg, B, w.cache_len))
    dl, c2 = ref.decode(params, cfg, c1, jnp.asarray(w.next_tokens), jnp.asarray(w.lengths))
    return Expected(np.asarray(lg), jax.tree.map(np.asarray, c1), np.asarray(dl), jax.tree.map(np.asarray, c2))


@dataclass
class PhaseResult:
    phase: str
    max_abs_error: float  # logits vs the reference (prefill: valid positions only)
    cache_error: float  # max abs difference of the canonical K/V cache
    predicted_bytes: dict  # comm.totals
    measured_bytes: dict  # hlo.totals of the compiled program
    compile_s: float
    step_s: float | None = None
    kv_cache_bytes_per_device: int = 0
    predicted_counts: dict = field(default_factory=dict)  # collectives executed per kind
    measured_counts: dict = field(default_factory=dict)

    @property
    def bytes_match(self) -> bool:
        return self.predicted_bytes == self.measured_bytes

    @property
    def counts_match(self) -> bool:
        return self.predicted_counts == self.measured_counts


def _pad(a, n):
    a = np.asarray(a)
    return jnp.asarray(np.concatenate([a, np.zeros((n - a.shape[0], *a.shape[1:]), a.dtype)]))


def run_layout(sm, stored, layout: Layout, w: Workload, expected: Expected, act_bytes: int = 4,
               timing_repeats: int = 0) -> list[PhaseResult]:
    """stored: the params sharded with the storage this layout needs (sm.shard_params)."""
    cfg = sm.cfg
    B, L = w.tokens.shape
    cache = sm.init_cache(layout, B, w.cache_len)
    Bc = sm.cache_shape(cache)[0]
    valid = np.arange(L)[None, :] < w.lengths[:, None]
    out = []
    for phase, args in (("prefill", (_pad(w.tokens, Bc), _pad(w.lengths, Bc))),
                        ("decode", (_pad(w.next_tokens, Bc)[:, None], _pad(w.lengths, Bc)))):
        t0 = time.perf_counter()
        compiled = sm.lowered(layout, phase, stored, *args, cache, all_logits=True).compile()
        compile_s = time.perf_counter() - t0
        ops = hlo.parse(compiled.as_text())
        inventory = comm.forward_collectives(cfg, layout, phase, B, L if phase == "prefill" else 1, w.cache_len,
                                             act_bytes=act_bytes, all_logits=True)
        measured, predicted = hlo.totals(ops), comm.totals(inventory)
        counts = {k: sum(c.count for c in inventory if c.kind == k) for k in comm.COLLECTIVE_KINDS}
        kv_bytes = sm.bytes_per_device(cache)
        logits, cache = compiled(stored, *args, cache)
        logits = np.asarray(logits)[:B]
        if phase == "prefill":
            err = float(np.max(np.where(valid[..., None], np.abs(logits - expected.prefill_logits), 0)))
            want_cache = expected.prefill_cache
        else:
            err = float(np.max(np.abs(logits[:, 0] - expected.decode_logits)))
            want_cache = expected.decode_cache
        got = sm.cache_to_reference(cache, B)
        cerr = max(float(np.max(np.abs(got[n] - want_cache[n]))) for n in ("k", "v"))
        step = None
        if timing_repeats:
            times = []
            for _ in range(timing_repeats):
                t0 = time.perf_counter()
                logits, cache = compiled(stored, *args, cache)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - t0)
            step = float(np.median(times))
        out.append(PhaseResult(phase, err, cerr, predicted, measured, compile_s, step, kv_bytes, counts,
                               hlo.counts(ops)))
    return out
