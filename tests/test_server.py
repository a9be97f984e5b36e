"""The OpenAI-compatible server on a tiny reference model: responses equal the engine's, streaming
equals non-streaming, concurrent requests batch continuously, bad input gets a 400 with a reason."""

import json
import threading

import jax
import pytest
from fastapi.testclient import TestClient

from hf_models import CHAT_TEMPLATE, train_tokenizer
from meshlm import reference
from meshlm.checkpoints.tokenizer import Tokenizer
from meshlm.config import preset
from meshlm.engine import Engine, ReferenceBackend, TextGenerator
from meshlm.sampling import SamplingParams
from meshlm.server import Scheduler, create_app

CFG = preset("tiny-llama").replace(tie_embeddings=False, vocab=320)


@pytest.fixture(scope="module")
def setup():
    params = reference.init_params(CFG, jax.random.key(0))
    tok = Tokenizer(train_tokenizer(), bos_id=None, eos_ids=[2], chat_template=CHAT_TEMPLATE, add_bos=False)
    engine = Engine(ReferenceBackend(CFG), params, slots=2, max_len=64, eos_ids=tok.eos_ids)
    sched = Scheduler(engine, tok, max_waiting=8)
    client = TestClient(create_app(sched, "tiny"))
    # an independent engine (same weights) gives the expected texts
    ref = TextGenerator(Engine(ReferenceBackend(CFG), params, slots=1, max_len=64, eos_ids=tok.eos_ids), tok)
    yield client, ref, tok
    sched.close()


def expected(ref, prompt, n, **kw):
    [c] = ref.complete([prompt], SamplingParams(max_tokens=n, **kw))
    return c


def test_completion_equals_the_engine(setup):
    client, ref, _ = setup
    r = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(ref, "The capital of France is", 8)
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)


def test_streaming_concatenates_to_the_same_text(setup):
    client, ref, _ = setup
    chunks = []
    with client.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 10,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == expected(ref, "Once upon a time", 10).text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(events) > 2  # it really streamed


def test_chat_uses_the_template(setup):
    client, ref, tok = setup
    msgs = [{"role": "user", "content": "Hi there"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    [c] = ref.complete([msgs], SamplingParams(max_tokens=6), chat=True)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": c.text}


def test_concurrent_requests_each_equal_alone(setup):
    """More requests than slots, at once: continuous batching must not change anyone's tokens."""
    client, ref, _ = setup
    prompts = ["The capital", "1234 + 5678", "def f(x):", "Once upon a time there", "héllo"]
    out = {}

    def call(p):
        out[p] = client.post("/v1/completions", json={"prompt": p, "max_tokens": 7, "temperature": 0}).json()

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for p in prompts:
        assert out[p]["choices"][0]["text"] == expected(ref, p, 7).text, p


def test_seeded_sampling_is_reproducible(setup):
    client, _, _ = setup
    req = {"prompt": "The capital", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    c = client.post("/v1/completions", json=req | {"seed": 8}).json()["choices"][0]["text"]
    assert a == b and a != c


@pytest.mark.parametrize("body,needle", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "word " * 200}, "context"),
    ({"prompt": [5, 999999]}, "token ids"),
    ({"prompt": ""}, "empty"),
])
def test_bad_requests_get_400_with_a_reason(setup, body, needle):
    client, _, _ = setup
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_models_and_health(setup):
    client, _, _ = setup
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
