"""Parity with Hugging Face transformers on tiny random models created offline (f32).

Loaded through meshlm's checkpoint loader and run by the reference model through the engine:
per-position logits within 1e-4 (max abs), decode-step logits equal the full forward's, and 32
greedy tokens identical to transformers' greedy generate.
"""

import numpy as np
import pytest
import torch

from hf_models import ARCHS, make_hf_model
from meshlm import reference
from meshlm.checkpoints import load_model
from meshlm.engine import Engine, ReferenceBackend
from meshlm.sampling import SamplingParams

import jax.numpy as jnp

TOL = 1e-4


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, d)
    return hf, load_model(d, progress=False)


def _tokens(n, seed=0, vocab=320):
    return np.random.RandomState(seed).randint(3, vocab, size=n).astype(np.int32)


def test_logits_match_transformers(pair):
    hf, m = pair
    toks = np.stack([_tokens(19, 1), _tokens(19, 2)])
    with torch.no_grad():
        want = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    got = np.asarray(reference.forward(m.params, m.cfg, jnp.asarray(toks)))
    assert np.abs(got - want).max() < TOL


def test_decode_steps_match_full_forward(pair):
    """Prefill 3 tokens, then T single-token decode steps: each step's logits = the forward's at that position."""
    hf, m = pair
    toks = _tokens(12, 3)
    with torch.no_grad():
        want = hf(torch.tensor(toks[None], dtype=torch.long)).logits.numpy()[0]
    be = ReferenceBackend(m.cfg)
    cache = be.init_cache(1, 16)
    logits, cache = be.prefill(m.params, jnp.asarray(toks[None, :3]), jnp.array([3], jnp.int32), cache)
    steps = [np.asarray(logits[0])]  # the backend returns the last prompt position
    for p in range(3, len(toks)):
        lg, cache = be.decode(m.params, cache, jnp.asarray(toks[p:p + 1]), jnp.array([p], jnp.int32))
        steps.append(np.asarray(lg[0]))
    assert np.abs(np.stack(steps) - want[2:]).max() < TOL


def test_32_greedy_tokens_match_transformers(pair):
    hf, m = pair
    prompt = _tokens(7, 4)
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    eng = Engine(ReferenceBackend(m.cfg), m.params, slots=2, max_len=64)
    got = eng.generate_ids([prompt.tolist()], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert got == want
