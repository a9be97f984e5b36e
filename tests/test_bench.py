"""`meshlm bench` on a tiny checkpoint: every row carries measured and predicted numbers that agree
with each other (errors, tokens/s, utilizations), the JSON and plot are written, bad input is one line."""

import json

import pytest

from hf_models import make_hf_model
from meshlm import bench
from meshlm.cli import main
from meshlm.costmodel import estimate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_llama")
    make_hf_model("llama", d)
    return d


def test_cli_rows_json_and_plot(model_dir, tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--model", str(model_dir), "--batch", "1,4", "--input-len", "5", "--gen-len", "6",
               "--quantize", "none,int8", "--layouts", "planner,wg-xyz/heads:ws2d/batch", "--repeats", "2",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2 and png.stat().st_size > 1000
    assert {r["weights"] for r in rows} == {"f32", "int8"}
    forced = [r for r in rows if r["pair"] != "planner"]
    assert {(r["prefill_layout"], r["decode_layout"]) for r in forced} == {("wg-xyz/heads", "ws2d/batch")}
    for r in rows:
        assert r["prefill_shape"][1] == 8  # prompts of 5 tokens run in the 8-token bucket
        assert 0 < r["decode_p50_s"] <= r["decode_p90_s"] <= r["decode_p99_s"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["decode_p50_s"])
        assert r["ttft_rel_err"] == pytest.approx((r["ttft_s"] - r["predicted_ttft_s"]) / r["predicted_ttft_s"])
        assert r["decode_rel_err"] == pytest.approx(
            (r["decode_p50_s"] - r["predicted_decode_s"]) / r["predicted_decode_s"])
        assert 0 < r["decode_mbu"] and 0 < r["prefill_mfu"] and r["compile_s"] >= 0
    errs = sorted(abs(r[k]) for r in rows for k in ("ttft_rel_err", "decode_rel_err"))
    summary = data["summary"]
    assert summary["max_abs_rel_err"] == pytest.approx(errs[-1]) and summary["n"] == 16 and data["complete"]
    assert summary["prefill"]["max_abs_rel_err"] == pytest.approx(max(abs(r["ttft_rel_err"]) for r in rows))
    dec = sorted(abs(r["decode_rel_err"]) for r in rows)
    assert summary["decode"]["median_abs_rel_err"] == pytest.approx((dec[3] + dec[4]) / 2)
    # the decode curve the plot draws: batches 1..64, the measured batch's point on it
    for r in rows:
        curve = dict((b, s) for b, s in r["predicted_decode_curve"])
        assert min(curve) == 1 and max(curve) == 64 and curve[r["batch"]] == pytest.approx(r["predicted_decode_s"])
        assert r["predicted_prefill_terms"]["compute"] > 0
    assert "relative error" in text and "ws2d/batch" in text
    assert all(w in text for w in ("prefill ", "decode ", "overall "))
    # the host check: the calibration's bandwidth pass after every configuration, beside the spec's
    host = data["host_check"]
    assert host["n"] == len(rows) and all(r["host_mem_bw"] > 0 for r in rows)
    assert host["min"] <= host["median"] <= host["max"] and host["chip_spec"] == rows[0]["chip_mem_bw"] > 0
    assert "memory bandwidth after each configuration" in text


def test_host_check_warns_when_the_host_moved():
    rows = [{"host_mem_bw": bw * 1e9, "chip_mem_bw": 40e9} for bw in (30, 31, 33)]
    h = bench.host_summary(rows)
    assert (h["n"], h["median"], h["min"], h["max"]) == (3, 31e9, 30e9, 33e9)
    slow = bench.host_lines(h)
    assert len(slow) == 2 and "22% slower" in slow[1] and "meshlm calibrate" in slow[1]
    assert "faster" in bench.host_lines(bench.host_summary([{"host_mem_bw": 50e9, "chip_mem_bw": 40e9}]))[1]
    assert len(bench.host_lines(bench.host_summary([{"host_mem_bw": 42e9, "chip_mem_bw": 40e9}]))) == 1
    assert bench.host_summary([{"chip_mem_bw": 40e9}]) is None and bench.host_lines(None) == []


def test_prediction_is_the_cost_model_for_what_ran(model_dir):
    host = bench.load_host(str(model_dir))
    c = bench.Config("ws2d/heads:ws2d/heads", None, 2, 5, 4)
    d = bench.deploy_config(host, c)
    m = bench.measure(d, c, repeats=1)
    p = bench.predict(d, c)
    B, L = m["prefill_shape"]
    assert (B, L) == (2, 8)
    assert m["weight_pages"] == d.engine.backend.sm.hugepages and "pages" in m["weight_pages"]
    cfg, lay = host.cfg, d.layouts
    # the engine's accounting: prefill projects the last position only; a decode step attends over
    # the whole dense cache (max_len = input 5 + gen 4 positions)
    assert p["ttft_s"] == estimate(cfg, d.chip, lay["prefill"], "prefill", 2, 8, 1, logits="last").latency_s
    assert p["prefill"].breakdown["matmul"] < estimate(cfg, d.chip, lay["prefill"], "prefill", 2, 8, 1).breakdown["matmul"]
    assert d.engine.max_len == 9
    assert p["decode_s"] == estimate(cfg, d.chip, lay["decode"], "decode", 2, 8, 1).step_latency_s
    # MBU counts the weights read plus the whole cache: doubling the batch adds cache bytes only
    c2 = bench.Config("ws2d/heads:ws2d/heads", None, 4, 5, 4)
    d2 = bench.deploy_config(host, c2)
    kv = lambda dd: sum(a.nbytes for a in __import__("jax").tree.leaves(dd.engine.cache)) / 8
    assert bench.decode_bytes_per_device(d2) - bench.decode_bytes_per_device(d) == pytest.approx(kv(d2) - kv(d))


def test_short_prefills_are_timed_more_often(model_dir, monkeypatch):
    host = bench.load_host(str(model_dir))
    c = bench.Config("ws2d/heads:ws2d/heads", None, 1, 5, 2)
    d = bench.deploy_config(host, c)
    monkeypatch.setattr(bench, "TTFT_BUDGET_S", 1e-9)  # every prefill "long": the minimum
    assert bench.measure(d, c, repeats=2)["ttft_repeats"] == 2
    monkeypatch.setattr(bench, "TTFT_BUDGET_S", 1e9)  # every prefill "short": the cap
    m = bench.measure(d, c, repeats=2)
    assert m["ttft_repeats"] == bench.TTFT_MAX_REPEATS and m["ttft_s"] > 0


def test_visits_take_the_median_visit():
    c = bench.Config("planner", None, 4, 16, 8)
    visit = lambda ttft, p50, steps: {"ttft_s": ttft, "decode_p50_s": p50, "decode_steps_s": steps,
                                      "first_run_s": 1.0, "compile_s": 0.5, "ttft_repeats": 3,
                                      "steps_per_dispatch": 4, "prefill_shape": [4, 16]}
    # the second visit ran in a slow stretch: its numbers are kept but are not the result
    ms = [visit(0.10, 0.020, [0.019, 0.021]), visit(0.17, 0.033, [0.032, 0.034]), visit(0.11, 0.021, [0.020, 0.022])]
    m = bench.merge_visits(c, ms)
    assert (m["ttft_s"], m["decode_p50_s"], m["visits"], m["ttft_repeats"]) == (0.11, 0.021, 3, 9)
    assert m["tokens_per_s"] == pytest.approx(4 / 0.021) and m["ttft_visits_s"] == [0.10, 0.17, 0.11]
    assert m["decode_p50_s"] <= m["decode_p90_s"] <= m["decode_p99_s"] == pytest.approx(0.034, rel=0.02)
    assert len(m["decode_steps_s"]) == 6 and bench.merge_visits(c, ms[:1]) is ms[0]


def test_cli_visits(model_dir, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["bench", "--model", str(model_dir), "--batch", "1,2", "--input-len", "4", "--gen-len", "4",
                 "--repeats", "1", "--visits", "2", "--json", str(out)]) == 0
    cap = capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["visits"] == 2 and len(data["rows"]) == 2 and cap.err.count("visit 1/2:") == 2
    for r in data["rows"]:
        assert r["visits"] == 2 and len(r["ttft_visits_s"]) == 2 and len(r["host_mem_bw_visits"]) == 2
        assert r["ttft_s"] == pytest.approx(sum(r["ttft_visits_s"]) / 2)  # the median of two


def test_cli_kv_cache_formats(model_dir, tmp_path, capsys):
    """--kv-cache auto,bf16: one row per format; the bf16 rows' engine holds a bf16 cache, priced
    and counted (MBU) at 2 bytes per element, the auto rows f32 (CPU's activation dtype)."""
    out = tmp_path / "kv.json"
    assert main(["bench", "--model", str(model_dir), "--batch", "2", "--input-len", "6", "--gen-len", "4",
                 "--kv-cache", "auto,bf16", "--repeats", "1", "--no-host-check", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["kv_cache"] for r in rows] == ["f32", "bf16"] and "f32/bf16" in text and "f32/f32" in text
    f32, bf16 = (r["predicted_decode_terms"] for r in rows)
    assert bf16["kv_load"] == pytest.approx(f32["kv_load"] / 2, rel=1e-12) and f32["kv_load"] > 0
    assert rows[1]["decode_mbu"] * rows[1]["decode_p50_s"] < rows[0]["decode_mbu"] * rows[0]["decode_p50_s"]


@pytest.mark.parametrize("args, msg", [(["--quantize", "int4"], "--quantize"), (["--kv-cache", "f16"], "--kv-cache"),
                                       (["--layouts", "ws2d/heads"], "PREFILL:DECODE")])
def test_bad_input_is_one_line(model_dir, capsys, args, msg):
    assert main(["bench", "--model", str(model_dir), "--batch", "1", "--input-len", "4", "--gen-len", "2",
                 *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_visits_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:  # argparse: usage and the reason, exit 2
        main(["bench", "--visits", "0"])
    assert e.value.code == 2 and "--visits: must be >= 1, got 0" in capsys.readouterr().err
