"""Sampling inside the jitted step: greedy, temperature, top-k, top-p, per-sequence seeds."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshlm.errors import MeshlmError
from meshlm.sampling import SamplingParams, argmax, batch_arrays, sample, xla_argmax

PROBS = np.array([0.05, 0.4, 0.3, 0.15, 0.1], np.float32)  # argmax 1; sorted: 1, 2, 3, 4, 0
_sample = jax.jit(sample)


def draw(sp: SamplingParams, n: int = 3000) -> collections.Counter:
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (n, 1))))
    ids = _sample(logits, jnp.arange(n, dtype=jnp.int32), batch_arrays([sp] * n))
    return collections.Counter(np.asarray(ids).tolist())


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 50).astype(np.float32))
    sp = batch_arrays([SamplingParams(), SamplingParams(temperature=2.0, seed=1), SamplingParams(), SamplingParams()])
    ids = np.asarray(_sample(logits, jnp.zeros(4, jnp.int32), sp))
    want = np.argmax(np.asarray(logits), -1)
    assert ids[[0, 2, 3]].tolist() == want[[0, 2, 3]].tolist()


def test_argmax_takes_the_first_of_tied_maxima_like_numpy():
    rng = np.random.RandomState(1)
    x = rng.randint(-3, 4, size=(64, 300)).astype(np.float32)  # many ties
    x[5] = -np.inf
    x[6, 17] = np.inf
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.tolist() == np.argmax(x, -1).tolist()


@pytest.mark.parametrize("fn", [argmax, xla_argmax], ids=["kernel", "xla"])
def test_argmax_across_chunks_and_nan_rows(fn):
    """Rows longer than the kernel's 4096-logit chunks: a tie across chunks takes the first; a row
    with a NaN gives 0 (both paths)."""
    x = np.random.RandomState(2).standard_normal((4, 9000)).astype(np.float32)
    x[0, [5000, 8500]] = 50.0  # tie in chunks 1 and 2
    x[1, 8999] = 50.0  # the very last logit
    x[2, 100] = np.nan
    got = np.asarray(jax.jit(fn)(jnp.asarray(x)))
    assert got.tolist() == [5000, 8999, 0, int(np.argmax(x[3]))]


def test_temperature_one_follows_the_distribution():
    c = draw(SamplingParams(temperature=1.0))
    freq = np.array([c[i] for i in range(5)]) / 3000
    assert np.abs(freq - PROBS).max() < 0.04


def test_top_k_keeps_the_k_largest_renormalized():
    c = draw(SamplingParams(temperature=1.0, top_k=2))
    assert set(c) == {1, 2}
    assert abs(c[1] / 3000 - 0.4 / 0.7) < 0.04


def test_top_k_one_is_greedy():
    assert set(draw(SamplingParams(temperature=5.0, top_k=1), 200)) == {1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.75))) == {1, 2, 3}  # 0.4 + 0.3 < 0.75
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.3))) == {1}


def test_low_temperature_sharpens():
    c = draw(SamplingParams(temperature=0.1))
    assert c[1] / 3000 > 0.9


def test_seed_and_position_determine_the_draw():
    logits = jnp.zeros((3, 1000))
    sp = batch_arrays([SamplingParams(temperature=1.0, seed=s) for s in (7, 7, 8)])
    a = np.asarray(_sample(logits, jnp.array([5, 5, 5]), sp))
    b = np.asarray(_sample(logits, jnp.array([5, 6, 5]), sp))
    assert a[0] == a[1] == b[0] and a[2] != a[0] and b[1] != b[0]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                dict(max_tokens=0), dict(seed=-1)])
def test_invalid_parameters(kw):
    with pytest.raises(MeshlmError):
        SamplingParams(**kw)
