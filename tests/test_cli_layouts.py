import json

from meshlm.cli import main

KEYS = {"ffn", "attention", "block", "phase", "mesh", "weights", "max_abs_error", "predicted_bytes", "measured_bytes",
        "weight_bytes_per_device", "kv_cache_bytes_per_device"}


def test_layouts_json_rows(capsys):
    rc = main(["layouts", "--devices", "8", "--mesh", "1x2x4", "--model", "tiny-palm", "--ffn", "wg-x",
               "--attention", "batch", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {(r["block"], r["phase"]) for r in rows} == {(b, p) for b in ("parallel", "serial") for p in ("prefill", "decode")}
    for r in rows:
        assert KEYS <= set(r)
        assert set(r["measured_bytes"]) == {"all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"}
        assert r["measured_bytes"] == r["predicted_bytes"] and r["measured_bytes"]["all-to-all"] > 0
        assert r["max_abs_error"] < 1e-4 and r["mesh"] == "1x2x4"


def test_layouts_table_and_bad_input(capsys):
    assert main(["layouts", "--mesh", "2x2x2", "--model", "tiny-llama", "--ffn", "ws2d", "--attention", "heads",
                 "--block", "model", "--weights", "int8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["ffn", "attn", "block", "phase", "mesh"] and len(out) == 3
    assert main(["layouts", "--ffn", "ws3d"]) == 2
    assert main(["layouts", "--mesh", "2x2x4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "ws3d" in err[0] and "16 devices" in err[1]
