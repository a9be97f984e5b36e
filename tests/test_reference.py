"""The reference model against itself: decode consistency, ragged prefill, and hand-checked pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm import reference as ref
from meshlm.config import PRESETS

CFGS = [PRESETS["tiny-palm"], PRESETS["tiny-llama"],
        PRESETS["tiny-llama"].replace(name="tiny-neox", block="parallel", parallel_norms=2, gated_mlp=False,
                                       activation="gelu", norm="layernorm", norm_bias=True, rotary_dim=8,
                                       qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=False),
        PRESETS["tiny-llama"].replace(name="tiny-gptj", block="parallel", rope_style="interleaved", rotary_dim=8,
                                       gated_mlp=False, activation="gelu_tanh", tie_embeddings=False,
                                       lm_head_bias=True)]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
def test_decode_steps_equal_full_forward(cfg):
    params = ref.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab)
    full = ref.forward(params, cfg, tokens)
    assert float(jnp.std(full)) > 0.3  # logits are O(1), so 1e-4 below is a real tolerance
    P = 5
    cache = ref.init_cache(cfg, 2, 16)
    logits, cache = ref.prefill(params, cfg, tokens[:, :P], jnp.full((2,), P, jnp.int32), cache)
    np.testing.assert_allclose(logits, full[:, :P], atol=1e-4)
    for t in range(P, 12):
        step, cache = ref.decode(params, cfg, cache, tokens[:, t], jnp.full((2,), t, jnp.int32))
        np.testing.assert_allclose(step, full[:, t], atol=1e-4)


def test_ragged_prefill_equals_each_prompt_alone():
    cfg = PRESETS["tiny-llama"]
    params = ref.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab)
    lengths = jnp.array([9, 4], jnp.int32)
    logits, cache = ref.prefill(params, cfg, tokens, lengths, ref.init_cache(cfg, 2, 12))
    alone = ref.forward(params, cfg, tokens[1:, :4])
    np.testing.assert_allclose(logits[1, :4], alone[0], atol=1e-4)
    # the cache holds nothing past each sequence's length
    assert float(jnp.abs(cache["k"][:, 1, 4:]).max()) == 0.0
    step, _ = ref.decode(params, cfg, cache, jnp.array([1, 7]), lengths)
    alone5 = ref.forward(params, cfg, jnp.concatenate([tokens[1:, :4], jnp.array([[7]])], axis=1))
    np.testing.assert_allclose(step[1], alone5[0, 4], atol=1e-4)


def test_rope_hand_values():
    cfg = PRESETS["tiny-llama"].replace(d_head=4, rope_theta=100.0)
    x = jnp.arange(1.0, 5.0).reshape(1, 1, 1, 4)
    pos = jnp.array([[3]])
    # half style: pairs (0, 2) and (1, 3) with frequencies 1 and 100^-0.5
    a0, a1 = 3.0, 3.0 * 100 ** -0.5
    want = [1 * np.cos(a0) - 3 * np.sin(a0), 2 * np.cos(a1) - 4 * np.sin(a1),
            3 * np.cos(a0) + 1 * np.sin(a0), 4 * np.cos(a1) + 2 * np.sin(a1)]
    np.testing.assert_allclose(ref.rope(x, pos, cfg).ravel(), want, rtol=1e-5)
    cfg_i = cfg.replace(rope_style="interleaved")
    want_i = [1 * np.cos(a0) - 2 * np.sin(a0), 2 * np.cos(a0) + 1 * np.sin(a0),
              3 * np.cos(a1) - 4 * np.sin(a1), 4 * np.cos(a1) + 3 * np.sin(a1)]
    np.testing.assert_allclose(ref.rope(x, pos, cfg_i).ravel(), want_i, rtol=1e-5)


def test_param_count_matches_config():
    for cfg in CFGS:
        params = ref.init_params(cfg, jax.random.key(0))
        n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        assert n == cfg.n_params(), cfg.name
