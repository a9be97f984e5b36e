"""`meshlm generate` on a tiny checkpoint: --json fields, streaming, forced layouts, errors."""

import json
import os
import subprocess
import sys

import pytest

from hf_models import make_hf_model
from meshlm.checkpoints import load_model
from meshlm.cli import main
from meshlm.engine import Engine, ReferenceBackend
from meshlm.sampling import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_llama")
    make_hf_model("llama", d)
    return d


def run_json(capsys, *args):
    assert main(["generate", PROMPT, "--json", "--no-progress", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_matches_the_reference_engine(capsys, model_dir):
    out = run_json(capsys, "--model", str(model_dir), "--devices", "8", "--mesh", "2x2x2", "--prefill-layout",
                   "wg-xyz/heads", "--decode-layout", "ws2d/batch", "--max-tokens", "9", "--temperature", "0")
    m = load_model(model_dir, progress=False)
    ids = m.tokenizer.encode(PROMPT)
    eng = Engine(ReferenceBackend(m.cfg), m.params, slots=1, max_len=64, eos_ids=m.tokenizer.eos_ids)
    want = eng.generate_ids([ids], SamplingParams(max_tokens=9))[0]
    assert out["prompt_token_ids"] == ids and out["token_ids"] == want
    assert out["text"] == m.tokenizer.decode(want)
    assert out["layouts"]["prefill"]["short"] == "wg-xyz/heads" and out["layouts"]["decode"]["short"] == "ws2d/batch"
    assert out["layouts"]["decode"]["mesh"] == [2, 2, 2]
    assert out["ttft_s"] > 0 and out["decode_s_per_token"] > 0
    assert out["latency"]["decode"]["predicted_s_per_token"] > 0


def test_bf16_kv_cache_on_one_and_eight_devices(capsys, model_dir):
    """--kv-cache bf16: the layouts say so, and the fused one-device path and the sharded XLA path
    (prefill wg-xyz, decode ws2d on 2x2x2) generate the same greedy tokens."""
    one = run_json(capsys, "--model", str(model_dir), "--max-tokens", "8", "--kv-cache", "bf16", "--quantize", "int8")
    eight = run_json(capsys, "--model", str(model_dir), "--max-tokens", "8", "--kv-cache", "bf16", "--quantize",
                     "int8", "--devices", "8", "--mesh", "2x2x2", "--prefill-layout", "wg-xyz/heads",
                     "--decode-layout", "ws2d/batch")
    assert one["layouts"]["decode"]["kv_cache"] == eight["layouts"]["prefill"]["kv_cache"] == "bf16"
    assert one["token_ids"] == eight["token_ids"] and len(one["token_ids"]) == 8


def test_streamed_text_equals_json_text(capsys, model_dir):
    args = ["--model", str(model_dir), "--max-tokens", "7", "--temperature", "0.9", "--top-k", "20", "--seed", "4"]
    want = run_json(capsys, *args)["text"]
    assert main(["generate", PROMPT, "--no-progress", *args]) == 0
    cap = capsys.readouterr()
    assert cap.out == want + "\n"
    assert "prefill" in cap.err and "decode" in cap.err and "predicted" in cap.err


@pytest.mark.parametrize("args,msg", [
    (["--mesh", "2x2xq"], "mesh must look like"),
    (["--decode-layout", "ws3d/heads"], "layout must be FFN/ATTENTION"),
    (["--temperature", "-1"], "temperature"),
    (["--devices", "4", "--mesh", "2x2x2"], "has 8 devices but --devices is 4"),
    (["--devices", "64"], "64 devices requested"),
])
def test_errors_are_one_line(capsys, model_dir, args, msg):
    assert main(["generate", PROMPT, "--no-progress", "--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_missing_model_is_one_line(capsys, tmp_path):
    assert main(["generate", PROMPT, "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_devices_flag_simulates_devices_in_a_fresh_process(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "meshlm", "generate", PROMPT, "--model", str(model_dir), "--devices",
                        "2", "--max-tokens", "3", "--json", "--no-progress"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    mesh = json.loads(r.stdout)["layouts"]["decode"]["mesh"]
    assert mesh[0] * mesh[1] * mesh[2] == 2


def test_chat_keeps_the_conversation(capsys, model_dir, monkeypatch):
    lines = iter(["hello", "and again", ""])
    seen = []
    import meshlm.engine as engine_mod
    encode = engine_mod.TextGenerator.encode
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(engine_mod.TextGenerator, "encode",
                        lambda self, p, chat=False: seen.append([dict(m) for m in p]) or encode(self, p, chat))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "4", "--no-progress", "--system", "be brief"]) == 0
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][3]["content"] == "and again" and len(capsys.readouterr().out.splitlines()) == 2
