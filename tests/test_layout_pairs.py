"""Every prefill layout x every decode layout on 8 simulated devices gives the reference's greedy
tokens for a ragged batch: one copy of the weights, the prefill cache converted to the decode
layout's attention sharding when they differ. (ws1d stores its weights as E F_xyz, so it pairs
only with ws1d: 8 x 8 + 2 x 2 = 68 pairs.) Each layout's prefill and decode compile once."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import reference
from meshlm.config import preset
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, MeshShape
from meshlm.sharded import ShardedModel

CFG = preset("tiny-llama").replace(tie_embeddings=False)
MESH = MeshShape(2, 2, 2)
LAYOUTS = [Layout(f, a, "f32", MESH) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS]
LENGTHS = [5, 9, 3, 12, 7, 1, 10, 4]  # 8 prompts: a batch every layout splits
STEPS, S = 6, 24


def greedy_reference(params, tokens, lengths):
    cache = reference.init_cache(CFG, len(lengths), S)
    logits, cache = reference.prefill(params, CFG, tokens, lengths, cache)
    last = logits[jnp.arange(len(lengths)), lengths - 1]
    out, tok, pos = [], jnp.argmax(last, -1), lengths
    for _ in range(STEPS):
        out.append(tok)
        logits, cache = reference.decode(params, CFG, cache, tok, pos)
        tok, pos = jnp.argmax(logits, -1), pos + 1
    return np.stack(out, 1)


@pytest.fixture(scope="module")
def setup():
    params = reference.init_params(CFG, jax.random.key(3))
    rng = np.random.default_rng(0)
    tokens = np.zeros((8, 16), np.int32)
    for b, n in enumerate(LENGTHS):
        tokens[b, :n] = rng.integers(3, CFG.vocab, n)
    lengths = np.array(LENGTHS, np.int32)
    sm = ShardedModel(CFG, MESH)
    stored = {s: sm.shard_params(params, storage=s) for s in ("1d", "2d")}
    return sm, stored, tokens, lengths, greedy_reference(params, jnp.asarray(tokens), jnp.asarray(lengths))


def test_every_prefill_decode_pair(setup):
    sm, stored, tokens, lengths, want = setup
    prefilled = {}
    for p in LAYOUTS:  # each prefill layout once
        w = stored["1d" if p.ffn == "ws1d" else "2d"]
        logits, cache = sm.prefill(p, w, tokens, lengths, sm.init_cache(p, 8, S))
        prefilled[p] = (np.asarray(jnp.argmax(logits, -1)), cache)
    pairs = [(p, d) for p, d in itertools.product(LAYOUTS, LAYOUTS) if (p.ffn == "ws1d") == (d.ffn == "ws1d")]
    assert len(pairs) == 68
    wrong = []
    for p, d in pairs:
        first, cache = prefilled[p]
        w = stored["1d" if d.ffn == "ws1d" else "2d"]
        cache = sm.convert_cache(cache, d)  # a copy: the prefill cache serves every decode layout
        tok, pos, got = first, lengths.copy(), []
        for _ in range(STEPS):
            got.append(tok)
            logits, cache = sm.decode(d, w, cache, tok, pos)
            tok, pos = np.asarray(jnp.argmax(logits, -1)), pos + 1
        if not np.array_equal(np.stack(got, 1), want):
            wrong.append(f"{p.short} -> {d.short}")
    assert not wrong, wrong
    assert len({tuple(r) for r in want}) > 4  # the prompts really decode differently
