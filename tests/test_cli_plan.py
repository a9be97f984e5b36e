"""`meshlm plan / pareto / paper / demo`: the JSON contract and one-line errors."""

import json

import pytest

from meshlm.cli import main

CHOICE_FIELDS = {"ffn", "attention", "weights", "mesh", "latency_s", "step_latency_s", "mfu",
                 "cost_chip_ms_per_token", "memory_per_chip_bytes", "fits", "breakdown"}


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_json_contract(capsys):
    rc, out, _ = run(capsys, "plan", "--model", "palm-540b", "--hardware", "tpu-v4", "--chips", "64", "--batch", "64",
                     "--phase", "decode", "--input-len", "2048", "--gen-len", "64", "--weights", "int8", "--json")
    assert rc == 0
    d = json.loads(out)
    c = d["choice"]
    assert CHOICE_FIELDS <= set(c)
    assert (c["ffn"], c["attention"], c["weights"]) == ("ws2d", "batch", "int8")
    assert len(c["mesh"]) == 3 and all(isinstance(v, int) for v in c["mesh"]) and c["mesh"][0] * c["mesh"][1] * c["mesh"][2] == 64
    assert {"compute", "memory", "communication"} <= set(c["breakdown"])
    assert 0 < c["mfu"] < 1 and c["fits"] is True
    assert c["latency_s"] == pytest.approx(64 * c["step_latency_s"])
    assert len(d["candidates"]) > 1 and all(CHOICE_FIELDS <= set(e) for e in d["candidates"])
    assert {"what", "kind", "axes", "bytes", "count", "seconds"} <= set(c["collectives"][0])


def test_plan_forced_options_restrict(capsys):
    rc, out, _ = run(capsys, "plan", "--chips", "64", "--batch", "8", "--phase", "prefill", "--ffn", "wg-xy",
                     "--attention", "heads", "--mesh", "4x4x4", "--weights", "bf16", "--json")
    d = json.loads(out)
    assert rc == 0 and len(d["candidates"]) == 1
    assert (d["choice"]["ffn"], d["choice"]["attention"], d["choice"]["mesh"]) == ("wg-xy", "heads", [4, 4, 4])


def test_plan_kv_cache_format(capsys):
    """--kv-cache f32 on TPU v4 (bf16 activations): every candidate caches in f32, the chosen one
    holds twice the KV cache of the default's."""
    argv = ("plan", "--chips", "64", "--batch", "64", "--phase", "decode", "--weights", "int8", "--json")
    d0 = json.loads(run(capsys, *argv)[1])
    d32 = json.loads(run(capsys, *argv, "--kv-cache", "f32", "--ffn", d0["choice"]["ffn"], "--attention",
                         d0["choice"]["attention"], "--mesh", "x".join(map(str, d0["choice"]["mesh"])))[1])
    assert d0["choice"]["kv_cache"] is None and {e["kv_cache"] for e in d32["candidates"]} == {"f32"}
    assert d32["choice"]["memory"]["kv_cache"] == pytest.approx(2 * d0["choice"]["memory"]["kv_cache"])
    assert d32["choice"]["step_latency_s"] > d0["choice"]["step_latency_s"]


def test_plan_table_output(capsys):
    rc, out, _ = run(capsys, "plan", "--chips", "16", "--model", "palm-62b", "--phase", "decode", "--batch", "32")
    assert rc == 0 and "choice: ffn ws2d" in out and "MFU" in out


@pytest.mark.parametrize("argv, msg", [
    (["--chips", "64", "--model", "gpt-17"], "unknown model"),
    (["--chips", "64", "--hardware", "tpu-v9"], "unknown chip"),
    (["--chips", "12"], "cannot form"),
    (["--chips", "64", "--mesh", "4x4x2"], "mesh 4x4x2 has 32 chips"),
    (["--chips", "64", "--batch", "0"], "--batch must be a positive integer"),
    (["--chips", "64", "--input-len", "-5"], "--input-len"),
    (["--chips", "64", "--gen-len", "abc"], "--gen-len"),
    (["--chips", "64", "--ffn", "ws9"], "unknown FFN layout"),
    (["--chips", "64", "--objective", "speed"], "unknown objective"),
    (["--chips", "64", "--kv-cache", "int4"], "unknown KV cache format"),
])
def test_plan_errors_are_one_line(capsys, argv, msg):
    rc, out, err = run(capsys, "plan", "--phase", "decode", *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and msg in err and "Traceback" not in err


def test_malformed_hardware_json(capsys, tmp_path):
    p = tmp_path / "chip.json"
    p.write_text('{"name": "x", "peak_flops": ')
    rc, _, err = run(capsys, "plan", "--phase", "decode", "--chips", "8", "--hardware", str(p))
    assert rc == 2 and err.count("\n") == 1 and "chip spec" in err


def test_pareto_json_and_png(capsys, tmp_path):
    png = tmp_path / "f.png"
    rc, out, _ = run(capsys, "pareto", "--model", "palm-62b", "--phase", "decode", "--chips", "8,16",
                     "--batches", "1,64,512", "--out", str(png), "--json")
    d = json.loads(out)
    assert rc == 0 and d["phase"] == "decode" and d["frontier"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_and_demo(capsys):
    rc, out, _ = run(capsys, "paper", "--json")
    d = json.loads(out)
    assert rc == 0 and len(d["table1"]) == 6 and len(d["tables2_3"]) == 8
    rc, out, _ = run(capsys, "paper")
    assert rc == 0 and "Table 1" in out and "Figure 3" in out
    rc, out, _ = run(capsys, "demo", "--planner-only")  # the real-model part: tests/test_smollm2.py
    assert rc == 0 and "PaLM 540B" in out and "wg-xyz" in out
