"""The engine on the sharded model, 8 simulated devices (mesh 2x2x2): prefill and decode layouts
mixed over one copy of the weights give the reference model's greedy tokens, for a batch of
prompts of different lengths. Ten pairs use every layout once as prefill and once as decode, and
every pair switches the attention layout (so the prefill cache is converted before insert); ws1d,
which stores the weights differently, pairs with itself. Together with the per-phase equality of
each layout to the reference (tests of meshlm.sharded) this covers every combination."""

import pytest

from hf_models import ARCHS, make_hf_model
from meshlm.checkpoints import load_model
from meshlm.deploy import ShardedBackend
from meshlm.engine import Engine, ReferenceBackend
from meshlm.layouts import ATTN_LAYOUTS, Layout, MeshShape
from meshlm.planner import SHARED_STORAGE_FFN
from meshlm.sampling import SamplingParams
from meshlm.sharded import ShardedModel

MESH = MeshShape(2, 2, 2)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
SP = SamplingParams(max_tokens=10, ignore_eos=True)
_F = list(SHARED_STORAGE_FFN)
_OTHER = {"heads": "batch", "batch": "heads"}
COMBOS = [(f"{f}/{a}", f"{_F[(i + 1) % len(_F)]}/{_OTHER[a]}") for i, f in enumerate(_F) for a in ATTN_LAYOUTS] + [
    ("ws1d/heads", "ws1d/batch"), ("ws1d/batch", "ws1d/heads")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8")
    make_hf_model("llama", d)
    host = load_model(d, placer_for=lambda cfg: (lambda path, a: a), progress=False)
    ref = load_model(d, progress=False)
    want = Engine(ReferenceBackend(ref.cfg), ref.params, slots=4, max_len=32).generate_ids(PROMPTS, SP)
    sm = ShardedModel(host.cfg, MESH)
    params = {s: sm.shard_params(host.params, weights="f32", storage=s) for s in ("1d", "2d")}
    return sm, params, want


def _layout(text):
    f, a = text.split("/")
    return Layout(f, a, "f32", MESH)


@pytest.mark.parametrize("prefill,decode", COMBOS)
def test_layout_pair_gives_reference_greedy_tokens(setup, prefill, decode):
    sm, params, want = setup
    p = params["1d" if prefill.startswith("ws1d") else "2d"]
    pre, dec = ShardedBackend(sm, _layout(prefill), p), ShardedBackend(sm, _layout(decode), p)
    eng = Engine(dec, p, slots=1, max_len=32, prefill_backend=pre)  # slots rounded up to the layout's multiple
    assert eng.generate_ids(PROMPTS, SP) == want


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("llama", "mistral")])  # mistral: llama's graph
def test_every_architecture_on_8_devices(tmp_path, arch):
    """MQA, grouped QKV, parallel blocks, biases, partial and interleaved rotary through one mixed pair."""
    make_hf_model(arch, tmp_path)
    host = load_model(tmp_path, placer_for=lambda cfg: (lambda path, a: a), progress=False)
    ref = load_model(tmp_path, progress=False)
    want = Engine(ReferenceBackend(ref.cfg), ref.params, slots=4, max_len=32).generate_ids(PROMPTS, SP)
    sm = ShardedModel(host.cfg, MESH)
    p = sm.shard_params(host.params)
    pre, dec = ShardedBackend(sm, _layout("wg-xyz/heads"), p), ShardedBackend(sm, _layout("ws2d/batch"), p)
    assert Engine(dec, p, slots=1, max_len=32, prefill_backend=pre).generate_ids(PROMPTS, SP) == want
