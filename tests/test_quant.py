import pytest
import jax.numpy as jnp
import numpy as np

from meshlm.quant import dequantize, dot_rows, quantize, row_block


def test_quantize_roundtrip_within_half_a_step():
    w = np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)
    w[:, 3] = 0  # an all-zero channel keeps a usable scale
    t = quantize(w, axis=-1)
    assert t["q"].dtype == np.int8 and t["s"].shape == (40,)
    err = np.abs(np.asarray(dequantize(t)) - w)
    assert np.all(err <= t["s"][None, :] / 2 + 1e-7)
    assert np.all(np.abs(t["q"]).max(axis=0)[np.arange(40) != 3] == 127)


def test_blocked_int8_dot_equals_dequantized_dot():
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, size=(512, 24), dtype=np.int8)  # 2 row blocks of 256: the scan path
    x = rng.normal(size=(5, 512)).astype(np.float32)
    got = np.asarray(dot_rows(jnp.asarray(x), jnp.asarray(q), jnp.float32))
    np.testing.assert_allclose(got, x @ q.astype(np.float32), rtol=1e-5, atol=1e-3)
    small = np.asarray(dot_rows(jnp.asarray(x[:, :100]), jnp.asarray(q[:100]), jnp.float32))
    np.testing.assert_allclose(small, x[:, :100] @ q[:100].astype(np.float32), rtol=1e-5, atol=1e-3)


def test_row_block_choice():
    assert row_block(512) == 256 and row_block(288) == 144 and row_block(200) is None and row_block(257) is None
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, size=(288, 8), dtype=np.int8)
    x = rng.normal(size=(3, 288)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dot_rows(jnp.asarray(x), jnp.asarray(q), jnp.float32)),
                               x @ q.astype(np.float32), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("C", [4096, 1100, 700])  # chunked by 1024, by 550, whole
def test_dot_t_int8_equals_the_dequantized_product(C):
    from meshlm.quant import dot_t

    rng = np.random.default_rng(C)
    q = rng.integers(-127, 128, (C, 96)).astype(np.int8)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    got = np.asarray(dot_t(jnp.asarray(x), jnp.asarray(q), jnp.float32))
    np.testing.assert_allclose(got, x @ q.astype(np.float32).T, rtol=1e-5, atol=1e-3)
