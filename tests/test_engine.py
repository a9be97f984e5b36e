"""The engine on the reference model: prefill/insert/generate, slots, ragged batches, EOS, streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import train_tokenizer
from meshlm import reference
from meshlm.checkpoints.tokenizer import Tokenizer
from meshlm.config import preset
from meshlm.engine import Detokenizer, Engine, ReferenceBackend, TextGenerator, bucket
from meshlm.errors import MeshlmError
from meshlm.sampling import SamplingParams

CFG = preset("tiny-llama").replace(tie_embeddings=False, vocab=320)  # untied: varied greedy tokens
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [3], [30, 31, 32]]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
    return reference.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    return Engine(ReferenceBackend(CFG), params, slots=2, max_len=64)


def rollout(params, prompt, n):
    """Greedy argmax rollout of the full causal forward (padded to one length: causal, so pads are unseen)."""
    ids = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([ids + [0] * (32 - len(ids))], jnp.int32)
        ids.append(int(jnp.argmax(reference.forward(params, CFG, padded)[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_equals_full_forward_rollout(engine, params):
    got = engine.generate_ids(PROMPTS[:2], GREEDY)
    assert got == [rollout(params, p, 10) for p in PROMPTS[:2]]
    assert len(set(got[0])) > 3  # a varied sequence, not one repeated token


@pytest.mark.parametrize("sp", [GREEDY, SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=3,
                                                       ignore_eos=True)])
def test_ragged_batch_with_slot_reuse_equals_each_prompt_alone(engine, sp):
    batch = engine.generate_ids(PROMPTS, sp)  # 5 prompts through 2 slots
    alone = [engine.generate_ids([p], sp)[0] for p in PROMPTS]
    assert batch == alone
    assert all(len(t) == 10 for t in batch)


def test_next_dispatch_is_launched_ahead_and_discarded_by_insert(params):
    """generate() runs k steps and launches the next k before reading their ids back; an insert
    voids that dispatch (it ran on the old slot state) and the steps are redone: slot 0's tokens
    are those of a run with no insert, slot 1 continues its new prompt exactly."""
    eng = Engine(ReferenceBackend(CFG), params, slots=2, max_len=64, steps_per_dispatch=2)
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    pre = eng.prefill(PROMPTS[:2], [sp, sp])
    eng.insert(pre, 0, 0, sp)
    eng.insert(pre, 1, 1, sp)
    chunks = [eng.generate() for _ in range(3)]
    assert eng._ahead is not None and all(c.shape == (2, 2) for c in chunks)
    eng.insert(eng.prefill([PROMPTS[2]], [sp]), 0, 1, sp)
    assert eng._ahead is None
    chunks += [eng.generate() for _ in range(2)] + [eng.generate(ahead=False)]
    assert eng._ahead is None
    steps = np.concatenate(chunks)  # [12, slots]
    alone = eng.generate_ids([PROMPTS[0], PROMPTS[2]], SamplingParams(max_tokens=13, temperature=0.8, seed=5,
                                                                       ignore_eos=True))
    assert steps[:, 0].tolist() == alone[0][1:]
    assert steps[6:, 1].tolist() == alone[1][1:7]


@pytest.mark.parametrize("k", [1, 3])
def test_steps_per_dispatch_change_no_token(params, engine, k):
    """Requests that end inside a dispatch (EOS, max_tokens, stop by accept, the context limit),
    slots reused mid-run: the same tokens and finish reasons at k = 1, 3 and the default 8."""
    sp = [SamplingParams(max_tokens=n, temperature=0.7, seed=1) for n in (4, 9, 2, 7, 30)]
    want = engine.generate_ids(PROMPTS, sp)
    eos = want[4][5]
    small = Engine(ReferenceBackend(CFG), params, slots=2, max_len=20, eos_ids=[eos], steps_per_dispatch=k)
    ref = Engine(ReferenceBackend(CFG), params, slots=2, max_len=20, eos_ids=[eos], steps_per_dispatch=1)
    got = [small.generate_ids(PROMPTS, sp), ref.generate_ids(PROMPTS, sp)]
    assert got[0] == got[1] and small.stats.finish == ref.stats.finish
    assert "stop" in small.stats.finish.values() and "length" in small.stats.finish.values()
    assert small.stats.decode_steps % k == 0


def test_seed_changes_sampled_tokens(engine):
    a = engine.generate_ids([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
    b = engine.generate_ids([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0, seed=2, ignore_eos=True))
    c = engine.generate_ids([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
    assert a == c and a != b


def test_eos_and_max_tokens_end_requests(params):
    want = rollout(params, PROMPTS[0], 6)
    eos = want[3]
    eng = Engine(ReferenceBackend(CFG), params, slots=2, max_len=64, eos_ids=[eos])
    got = eng.generate_ids([PROMPTS[0], PROMPTS[1]], SamplingParams(max_tokens=4))
    assert got[0] == want[:want.index(eos)] and eng.stats.finish[0] == "stop"
    assert len(got[1]) == 4 and eng.stats.finish[1] == "length"


def test_steps_compile_once_per_bucket(engine):
    engine.generate_ids(PROMPTS, GREEDY)
    n_prefill, n_insert = engine._prefill_jit._cache_size(), engine._insert_jit._cache_size()
    engine.generate_ids(PROMPTS, GREEDY)
    assert engine._generate_jit._cache_size() == 1  # one decode shape: all slots, every step
    assert (engine._prefill_jit._cache_size(), engine._insert_jit._cache_size()) == (n_prefill, n_insert)
    assert bucket(5) == 8 and bucket(9) == 16 and bucket(1, 1) == 1


def test_prompt_too_long_or_empty(engine):
    with pytest.raises(MeshlmError, match="does not fit"):
        engine.generate_ids([[1] * 64], GREEDY)
    with pytest.raises(MeshlmError, match="empty prompt"):
        engine.generate_ids([[]], GREEDY)


def test_context_limit_ends_with_length(params):
    eng = Engine(ReferenceBackend(CFG), params, slots=1, max_len=16)
    got = eng.generate_ids([[1] * 10], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(got[0]) == 6 and eng.stats.finish[0] == "length"


# ---- text ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return Tokenizer(train_tokenizer(), bos_id=None, eos_ids=[2], chat_template=None, add_bos=False)


def test_detokenizer_never_splits_utf8(tok):
    text = "héllo 東京 ✓ done"
    ids = tok.encode(text)
    dt = Detokenizer(tok.decode)
    deltas = []
    for i in ids:
        dt.add(i)
        deltas.append(dt.delta())
    deltas.append(dt.delta(final=True))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len(text.encode()) // 2  # multi-byte characters span several byte tokens


def test_detokenizer_stops_before_stop_string(tok):
    text = "The capital of France is Paris. Once upon"
    dt = Detokenizer(tok.decode, stop=["Paris", "zzz"])
    deltas = []
    for i in tok.encode(text):
        go_on = dt.add(i)
        deltas.append(dt.delta())
        if not go_on:
            break
    deltas.append(dt.delta(final=True))
    assert "".join(deltas) == dt.text == "The capital of France is "
    assert dt.stopped


def test_text_generator_streams_what_complete_returns(params, tok):
    eng = Engine(ReferenceBackend(CFG), params, slots=2, max_len=64, eos_ids=tok.eos_ids)
    tg = TextGenerator(eng, tok)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    streamed = "".join(tg.stream("The capital of France is", sp))
    [c] = tg.complete(["The capital of France is"], sp)
    assert streamed == c.text == tok.decode(c.token_ids) and len(c.token_ids) == 12
    stop = c.text[3:6]
    [s] = tg.complete(["The capital of France is"], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert s.text == c.text[:c.text.index(stop)] and s.finish_reason == "stop"


def test_cache_is_preallocated_and_donated(engine):
    engine.generate_ids([PROMPTS[0]], GREEDY)
    old = jax.tree.leaves(engine.cache)
    engine.generate()  # consumes the dispatch launched ahead, launches the next (donating the cache)
    new = jax.tree.leaves(engine.cache)
    assert all(a.is_deleted() for a in old)  # donated: updated in place, not copied
    assert [a.shape for a in new] == [a.shape for a in old]


def test_one_token_comes_from_prefill_alone(engine, params):
    got = engine.generate_ids(PROMPTS[:3], SamplingParams(max_tokens=1, ignore_eos=True))
    assert got == [rollout(params, p, 1) for p in PROMPTS[:3]]
    assert engine.stats.decode_steps == 0  # finished at prefill: never inserted, no decode step


def test_steps_per_dispatch_is_checked_and_the_cli_states_its_default(params):
    from meshlm.cli.generate import STEPS_HELP_DEFAULT
    from meshlm.engine import DEFAULT_STEPS_PER_DISPATCH

    with pytest.raises(MeshlmError, match="at least 1"):
        Engine(ReferenceBackend(CFG), params, slots=1, max_len=16, steps_per_dispatch=0)
    assert STEPS_HELP_DEFAULT == DEFAULT_STEPS_PER_DISPATCH
