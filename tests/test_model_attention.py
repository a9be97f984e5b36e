"""Prefill attention in query blocks equals one masked softmax over the whole prompt."""

import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import model


@pytest.mark.parametrize("budget", [1 << 10, 310_000, 1 << 30])  # 32-row blocks, 64-row blocks, one block
def test_blocked_causal_attention_equals_full(monkeypatch, budget):
    monkeypatch.setattr(model, "SCORE_BLOCK_BYTES", budget)
    rng = np.random.default_rng(0)
    B, L, Kc, G, D = 3, 100, 2, 2, 8  # 100: the last block is ragged
    q = jnp.asarray(rng.standard_normal((B, L, Kc, G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, L, Kc, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, L, Kc, D)), jnp.float32)
    lengths = jnp.asarray([100, 37, 1])
    pos = jnp.arange(L)
    mask = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])
    want = model.attend(q, k, v, mask)
    got = model.attend_causal(q, k, v, lengths)
    valid = (pos[None, :] < lengths[:, None])[..., None, None, None]
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-6)
