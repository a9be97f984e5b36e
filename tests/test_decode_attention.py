"""The decode-attention CPU kernel (meshlm.kernels.decode_attention) against float64 numpy and
against the XLA path (`model.attend`), through `model.attend_one` and inside shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshlm import kernels
from meshlm.model import attend, attend_one

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable here")


def _numpy(q, k, v, positions):
    """float64 reference: q [B, K, G, D], k, v [B, S, K, D]."""
    B, K, G, D = q.shape
    S = k.shape[1]
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bkgd,bskd->bkgs", q, k) / np.sqrt(D)
    for b, p in enumerate(positions):
        if p < 0:
            s[b] = 0.0  # a fully masked row: uniform over all S, as XLA's softmax of equal scores
        else:
            s[b, ..., p + 1:] = -np.inf
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bkgs,bskd->bkgd", w, v)


def _case(B, S, K, G, D, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, K, G, D)).astype(np.float32) * 2
    k = rng.standard_normal((B, S, K, D)).astype(np.float32)
    v = rng.standard_normal((B, S, K, D)).astype(np.float32)
    return q, k, v


# small and split work (B * S * K * D * 8 bytes >= 64 KiB runs in chunks merged across threads),
# D not a multiple of 16, one and several query heads per KV head; D = 64 and 128 take the blocked
# path (16 rows at a time, the last block of a chunk short)
@pytest.mark.parametrize("B,S,K,G,D", [(1, 7, 1, 1, 16), (2, 40, 3, 3, 40), (3, 700, 2, 4, 64),
                                       (1, 2048, 3, 3, 64), (5, 300, 1, 8, 24), (2, 333, 2, 8, 128),
                                       (1, 9, 3, 3, 64)])
def test_matches_float64(B, S, K, G, D):
    q, k, v = _case(B, S, K, G, D)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, S, B).astype(np.int32)
    pos[0] = S - 1
    got = np.asarray(jax.jit(kernels.decode_attention)(q, k, v, pos))
    np.testing.assert_allclose(got, _numpy(q, k, v, pos), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pos", [[700], [129], [0, 900, 31]])
def test_rows_short_of_a_long_cache(pos):
    """Rows are split into chunks by the longest attended row, not the cache length (2048)."""
    q, k, v = _case(len(pos), 2048, 3, 3, 64, seed=2)
    pos = np.array(pos, np.int32)
    got = np.asarray(jax.jit(kernels.decode_attention)(q, k, v, pos))
    np.testing.assert_allclose(got, _numpy(q, k, v, pos), rtol=2e-5, atol=2e-5)


def test_positions_past_the_cache_and_negative_match_the_xla_masking():
    """positions >= S attend to all S; negative (a fully masked row) gives XLA's uniform average."""
    q, k, v = _case(4, 200, 2, 2, 32, seed=3)
    pos = np.array([-1, 0, 199, 500], np.int32)
    got = np.asarray(kernels.decode_attention(q, k, v, pos))
    mask = np.arange(200)[None, None, :] <= pos[:, None, None]
    want = np.asarray(attend(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0, 1, 0], v[0, :, 1].mean(0), rtol=1e-5, atol=1e-6)


def test_attend_one_lowers_the_kernel_on_cpu_and_agrees_with_the_fallback():
    q, k, v = _case(2, 64, 3, 3, 64, seed=5)
    pos = np.array([10, 63], np.int32)
    f = jax.jit(attend_one)
    assert "meshlm_decode_attention" in f.lower(q, k, v, pos).compile().as_text()
    mask = np.arange(64)[None, None, :] <= pos[:, None, None]
    want = attend(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))[:, 0]
    np.testing.assert_allclose(np.asarray(f(q, k, v, pos)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_attend_one_keeps_the_xla_path_for_a_bf16_cache():
    q, k, v = _case(1, 16, 1, 2, 32)
    f = jax.jit(attend_one)
    low = f.lower(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), np.array([5], np.int32))
    assert "meshlm_decode_attention" not in low.compile().as_text()


def test_inside_shard_map_batch_sharded_on_8_devices():
    """The batch-sharded KV cache (the paper's multiquery layout): each device attends its rows."""
    mesh = jax.make_mesh((8,), ("x",))
    q, k, v = _case(16, 96, 1, 4, 64, seed=7)
    pos = np.random.default_rng(8).integers(0, 96, 16).astype(np.int32)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("x")))  # noqa: E731
    f = jax.jit(jax.shard_map(attend_one, mesh=mesh, in_specs=(P("x"),) * 4, out_specs=P("x")))
    got = np.asarray(f(put(q), put(k), put(v), put(pos)))
    np.testing.assert_allclose(got, _numpy(q, k, v, pos), rtol=2e-5, atol=2e-5)


# D = 64 and 128 take the blocked path (a bf16 row read as its even and odd elements), D = 40 the
# per-row one; G = 1, 3, 8 query heads per KV head
@pytest.mark.parametrize("B,S,K,G,D", [(2, 300, 3, 3, 64), (1, 1500, 2, 1, 128), (3, 90, 1, 8, 40), (1, 5, 3, 3, 64)])
def test_bf16_cache_read_as_stored_matches_float64_of_its_values(B, S, K, G, D):
    """A bf16 cache is read in place (half the bytes) and widened exactly: the result is the
    float64 attention over the bf16 values themselves, to f32 rounding."""
    q, k, v = _case(B, S, K, G, D, seed=11)
    kb, vb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    pos = np.random.default_rng(12).integers(0, S, B).astype(np.int32)
    pos[0] = S - 1
    got = np.asarray(jax.jit(kernels.decode_attention)(q, kb, vb, pos))
    want = _numpy(q, np.asarray(kb, np.float32), np.asarray(vb, np.float32), pos)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # and not the attention over the f32 values it was rounded from (bf16 keeps 8 bits)
    assert np.max(np.abs(got - _numpy(q, k, v, pos))) > 1e-3


def test_attend_one_reads_a_bf16_cache_in_place_with_f32_queries():
    """f32 queries against a bf16 cache: the kernel, with no f32 copy of the cache in the program."""
    q, k, v = _case(2, 64, 3, 3, 64, seed=13)
    kb, vb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    pos = np.array([10, 63], np.int32)
    hlo = jax.jit(attend_one).lower(q, kb, vb, pos).compile().as_text()
    assert "meshlm_decode_attention" in hlo and "f32[2,64,3,64]" not in hlo
    mask = np.arange(64)[None, None, :] <= pos[:, None, None]
    want = attend(jnp.asarray(q)[:, None], kb, vb, jnp.asarray(mask))[:, 0]
    np.testing.assert_allclose(np.asarray(jax.jit(attend_one)(q, kb, vb, pos)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
