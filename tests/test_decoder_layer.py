"""The fused decode layer (meshlm.kernels.decoder_layer) that a one-device int8 or f32 engine runs:
equal to the reference (int8: on the dequantized weights) and to the unfused XLA path, the cache
updated in place, and used exactly where its conditions hold."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import kernels, quant
from meshlm.config import ModelConfig, preset
from meshlm.layouts import Layout, MeshShape
from meshlm.quant import int8_as_f32
from meshlm.sharded import ShardedModel
from sharded_cases import S, TOL, check_layout, reference_run

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.reason()}")

M1 = MeshShape(1, 1, 1)
BASE = dict(n_layers=2, d_model=64, d_ff=192, vocab=250, max_seq_len=64, block="serial")
# interleaved pairs on a partial rotary dim, and multiquery (K = 1, 3 query heads of 64) with an
# untied lm_head
GPTJ_ROPE = ModelConfig(name="llama-interleaved", n_heads=4, n_kv_heads=2, d_head=16, rotary_dim=8,
                        rope_style="interleaved", **BASE)
MQA = ModelConfig(name="llama-mqa", n_heads=3, n_kv_heads=1, d_head=64, **{**BASE, "vocab": 256},
                  tie_embeddings=False)


def _decode_hlo(sm, params, layout, batch=8):
    cache = sm.init_cache(layout, batch, S)
    low = sm.lowered(layout, "decode", params, jnp.zeros((batch, 1), jnp.int32), jnp.zeros((batch,), jnp.int32), cache)
    return low.compile().as_text()


@pytest.mark.parametrize("cfg,weights", [(preset("tiny-llama"), "int8"), (GPTJ_ROPE, "int8"), (MQA, "int8"),
                                         (preset("tiny-llama"), "f32"), (MQA, "f32")],
                         ids=lambda v: getattr(v, "name", v))
def test_fused_decode_equals_reference(cfg, weights):
    """int8: against the reference on the dequantized weights; f32: on the weights themselves."""
    sm = ShardedModel(cfg, M1)
    params = reference_run(cfg)[0]
    stored = {s: sm.shard_params(params, weights, s) for s in ("1d", "2d")}
    layout = Layout("ws2d", "batch", weights, M1)
    hlo = _decode_hlo(sm, stored["2d"], layout)
    assert hlo.count('"meshlm_decoder_layer"') == cfg.n_layers
    # the output projection (tied embedding or lm_head) is packed too when V allows (250: not)
    head = stored["2d"]["embed" if cfg.tie_embeddings else "lm_head"]
    assert ("p" in head) == (cfg.vocab % 64 == 0)
    # the cache is updated in place: no copy of a [B, S, K, D] array anywhere in the step
    assert not re.search(rf"f32\[8,{S},{cfg.n_kv_heads},{cfg.d_head}\]\{{[^}}]*\}} copy\(", hlo)
    assert not check_layout(sm, stored, layout, params=int8_as_f32(params, cfg) if weights == "int8" else None)


def test_fused_equals_unfused_path_with_positions_at_and_past_the_cache_end(monkeypatch):
    """Same int8 weights, row-major (XLA path with the matmul and attention kernels) vs packed (the
    fused layer): logits and caches agree to f32 rounding, including a token at the last cache
    position and one past it (attends to everything, writes nothing)."""
    cfg = preset("tiny-llama")
    sm = ShardedModel(cfg, M1)
    params = reference_run(cfg)[0]
    layout = Layout("ws2d", "heads", "int8", M1)
    packed = sm.shard_params(params, "int8")
    with monkeypatch.context() as m:
        m.setattr(quant.kernels, "enabled", lambda: False)  # shard without packing
        plain = sm.shard_params(params, "int8")
    assert "p" in packed["layers"][0]["ffn_in"] and "q" in plain["layers"][0]["ffn_in"]
    assert "meshlm_decoder_layer" not in _decode_hlo(sm, plain, layout)
    B = 4
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, 9), 0, cfg.vocab, dtype=jnp.int32)
    lengths = jnp.array([9, 5, 1, 7], jnp.int32)
    positions = jnp.array([9, S - 1, S, 7], jnp.int32)
    out = []
    for p in (plain, packed):
        cache = sm.init_cache(layout, B, S)
        _, cache = sm.prefill(layout, p, tokens, lengths, cache)
        logits, cache = sm.decode(layout, p, cache, jnp.array([3, 5, 7, 11], jnp.int32), positions)
        logits2, cache = sm.decode(layout, p, cache, jnp.array([1, 2, 3, 4], jnp.int32), positions + 1)
        out.append((np.asarray(logits), np.asarray(logits2), sm.cache_to_reference(cache, B)))
    (l1, l2, c), (f1, f2, fc) = out
    assert np.max(np.abs(l1)) > 1.0  # logits of order 1-10: TOL is f32 rounding, not slack
    np.testing.assert_allclose(f1, l1, atol=TOL, rtol=0)
    np.testing.assert_allclose(f2, l2, atol=TOL, rtol=0)
    for n in ("k", "v"):
        np.testing.assert_allclose(fc[n], c[n], atol=TOL, rtol=0)
    # row 2 (position S, then S + 1) wrote nothing past its 1-token prompt
    assert np.all(fc["k"][:, 2, 1:] == 0) and np.all(fc["v"][:, 2, 1:] == 0)
    # row 1 wrote position S - 1 (its prompt filled 0..4, nothing between)
    assert np.all(fc["k"][:, 1, S - 1] != 0) and np.all(fc["k"][:, 1, 5:S - 1] == 0)


@pytest.mark.parametrize("weights,mesh", [("bf16", M1), ("f32", MeshShape(2, 2, 2)), ("int8", MeshShape(2, 2, 2))])
def test_not_fused_where_its_conditions_fail(weights, mesh):
    """bf16 weights, or more than one device (weights are packed on one device only): the XLA path."""
    cfg = preset("tiny-llama")
    sm = ShardedModel(cfg, mesh)
    params = sm.shard_params(reference_run(cfg)[0], weights)
    assert not any(isinstance(w, dict) and "p" in w for w in params["layers"][0].values())
    assert "meshlm_decoder_layer" not in _decode_hlo(sm, params, Layout("ws2d", "batch", weights, mesh))


def test_bf16_cache_fused_equals_unfused_and_rounds_writes_to_nearest_even(monkeypatch):
    """A layout with kv_cache="bf16" caches in bf16 on both paths: the fused layer (packed int8)
    agrees with the XLA path (row-major int8) to bf16 rounding of the cache, and the rows it
    writes in layer 0 (inputs independent of the cache) are exactly the f32 run's rows rounded to
    nearest even, as XLA's convert (truncation would differ in about half of them)."""
    cfg = preset("tiny-llama")
    sm = ShardedModel(cfg, M1)
    params = reference_run(cfg)[0]
    packed = sm.shard_params(params, "int8")
    with monkeypatch.context() as m:
        m.setattr(quant.kernels, "enabled", lambda: False)
        plain = sm.shard_params(params, "int8")
    B = 4
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, 9), 0, cfg.vocab, dtype=jnp.int32)
    lengths = jnp.array([9, 5, 1, 7], jnp.int32)
    positions = jnp.array([9, 5, 1, 7], jnp.int32)
    runs = {}
    for name, p, kv in (("plain", plain, "bf16"), ("fused", packed, "bf16"), ("fused32", packed, None)):
        layout = Layout("ws2d", "heads", "int8", M1, kv_cache=kv)
        assert ("meshlm_decoder_layer" in _decode_hlo(sm, p, layout, batch=B)) == (name != "plain")
        cache = sm.init_cache(layout, B, S)
        assert cache["k"][0].dtype == (jnp.bfloat16 if kv else jnp.float32)
        _, cache = sm.prefill(layout, p, tokens, lengths, cache)
        logits, cache = sm.decode(layout, p, cache, jnp.array([3, 5, 7, 11], jnp.int32), positions)
        assert cache["k"][0].dtype == (jnp.bfloat16 if kv else jnp.float32)
        runs[name] = (np.asarray(logits), {n: a.astype(np.float32) for n, a in sm.cache_to_reference(cache, B).items()})
    (lp, cp), (lf, cf), (l32, c32) = runs["plain"], runs["fused"], runs["fused32"]
    np.testing.assert_allclose(lf, lp, atol=2e-3, rtol=0)
    assert np.max(np.abs(lf - l32)) > 0  # the bf16 cache is what the layer attended over
    for n in ("k", "v"):
        np.testing.assert_allclose(cf[n], cp[n], rtol=2 ** -7, atol=1e-6)
        rows = cf[n][0, np.arange(B), np.asarray(positions)]
        want = c32[n][0, np.arange(B), np.asarray(positions)].astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(rows, want)
