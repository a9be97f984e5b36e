"""`meshlm calibrate`: the spec it writes is one the planner loads, with the collective model's
algebra right (t = D/link_bw * (k-1)/k + hop_latency * (k-1) on a switch of k devices)."""

import json

import numpy as np
import pytest

from meshlm.calibrate import Calibration, to_chip_dict
from meshlm.cli import main
from meshlm.hardware import chip_from_dict, load_chip


def test_chip_dict_inverts_the_fitted_line():
    cal = Calibration(platform="gpu", device_kind="H100", n_devices=8, matmul_flops={"bf16": 7e14, "f32": 5e13},
                      mem_bw=3e12, collective_bw=2e11, collective_latency_s=7e-5)
    import meshlm.calibrate as c

    c_dev = c._device_memory
    c._device_memory = lambda: 80e9
    try:
        spec = to_chip_dict(cal, "bf16")
    finally:
        c._device_memory = c_dev
    chip = chip_from_dict(spec)
    k, D = 8, 64e6
    # the measured line at D bytes, and what the spec's parameters give back
    t_measured = 7e-5 + D / 2e11
    t_model = D / chip.link_bw * (k - 1) / k + chip.hop_latency_s * (k - 1)
    assert abs(t_model - t_measured) / t_measured < 1e-9
    assert chip.flops == 7e14 and chip.mem_bw == 3e12 and chip.vendor_peaks == ()


def test_cli_writes_a_loadable_spec(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    chip = load_chip(str(out))
    spec = json.loads(out.read_text())
    assert chip.name == "local-cpu-8" and chip.switch_domain == 8
    # sane orders of magnitude for any machine that runs this suite
    assert 1e8 < spec["peak_flops"] < 1e15 and 1e8 < spec["hbm_bw"] < 1e13
    assert "f32" in spec["source"] and "int8" in spec["source"]
    # the measured curve (quick: 4 rows counts) for the compute dtype and the int8 path, the engine's overheads
    assert [m for m, _ in spec["matmul_curve"]["f32"]] == [1, 8, 64, 512] and set(spec["matmul_curve"]) == {"f32", "int8"}
    assert chip.matmul_rate("int8", 8) == pytest.approx(spec["matmul_curve"]["int8"][1][1], rel=1e-12)
    per_phase = ("pass_overhead_s", "layer_overhead_s", "score_elem_s", "kv_elem_s")
    assert all(set(spec[f]) == {"prefill", "decode"} for f in per_phase)
    assert set(spec["act_elem_s"]) == {"prefill"} and spec["act_elem_s"]["prefill"] >= 0
    # prefill attention per score at each batch timed (quick: 1 and 2), batch 1 also as score_elem_s
    assert [b for b, _ in spec["prefill_score_curve"]] == [1, 2]
    assert spec["prefill_score_curve"][0][1] == spec["score_elem_s"]["prefill"]
    assert min([spec["logit_elem_s"], *(v for f in per_phase for v in spec[f].values())]) >= 0
    # one row's streaming rate against the working set (quick: 1 and 4 MiB per device), beside the chain's size
    assert set(spec["stream_curve"]) == {"f32", "int8"} and spec["matmul_curve_bytes"] == 4 << 20
    for pts in spec["stream_curve"].values():
        assert len(pts) == 2 and pts[0][0] < pts[1][0] <= 4 << 20 and all(1e8 < r < 1e13 for _, r in pts)
    # decode attention timed on each KV cache format the engine offers
    assert set(spec["kv_format_elem_s"]) == {"f32", "bf16"} and min(spec["kv_format_elem_s"].values()) >= 0


def test_int8_rate_and_f32_cache_reach_the_cost_model():
    """A CPU spec prices int8 weight matmuls at the measured int8-path rate and K/V in f32."""
    from meshlm.costmodel import estimate
    from meshlm.layouts import Layout, MeshShape

    cal = Calibration(platform="cpu", device_kind="cpu", n_devices=1,
                      matmul_flops={"f32": 2e11, "bf16": 2e10, "int8": 5e10}, mem_bw=2e10)
    spec = to_chip_dict(cal, "f32")
    chip = chip_from_dict(json.loads(json.dumps(spec)))
    assert chip.act_bytes == 4 and dict(chip.weight_flops) == {"bf16": 2e10, "int8": 5e10}
    from meshlm.config import PRESETS

    cfg = next(iter(PRESETS.values()))
    lay = lambda w: Layout("ws2d", "heads", w, MeshShape(1, 1, 1))
    f32, i8 = (estimate(cfg, chip, lay(w), "prefill", 8, 512, 1) for w in ("f32", "int8"))
    assert i8.breakdown["matmul"] / f32.breakdown["matmul"] == 2e11 / 5e10
    bf16_chip = chip_from_dict({**spec, "act_bytes": 2})
    d4, d2 = (estimate(cfg, c, lay("f32"), "decode", 4, 512, 8) for c in (chip, bf16_chip))
    assert d4.memory["kv_cache"] == 2 * d2.memory["kv_cache"]


def test_attention_terms_are_what_bandwidth_and_flops_leave_over():
    """A decode step that reads K/V at exactly the memory bandwidth leaves no per-element cost; one
    at half of it leaves act_bytes / mem_bw per element. Prefill: the time above the FLOP floor,
    per score; never negative."""
    from meshlm.calibrate import attention_fields

    B, S, K, G, D = 2, 1000, 2, 3, 64
    elems = 2 * B * S * K * D
    pre = (1, 100, 2, 3, 64)
    scores = 100 * 100 * 6  # per sequence
    floor = 4.0 * scores * 64 / 1e11  # per sequence
    # batch 1 at 3 ns per score beyond the floor, batch 4 at 1.5 ns
    batches = [(1, floor + scores * 3e-9), (4, 4 * (floor + scores * 1.5e-9))]
    attn = {"decode_shape": (B, S, K, G, D), "prefill_shape": pre, "decode_s": elems * 4 / 2e10,
            "prefill_batches": batches}
    f = attention_fields(attn, mem_bw=2e10, flops=1e11, act_bytes=4)
    assert f["kv_elem_s"]["decode"] == pytest.approx(0.0, abs=1e-15)
    assert f["score_elem_s"]["prefill"] == pytest.approx(3e-9, rel=1e-6)
    assert [b for b, _ in f["prefill_score_curve"]] == [1, 4]
    assert [v for _, v in f["prefill_score_curve"]] == pytest.approx([3e-9, 1.5e-9], rel=1e-6)
    slow = attention_fields({**attn, "decode_s": 2 * elems * 4 / 2e10, "prefill_batches": [(1, floor / 2)]},
                            2e10, 1e11, 4)
    assert slow["kv_elem_s"]["decode"] == pytest.approx(4 / 2e10, rel=1e-6)
    assert "kv_format_elem_s" not in f  # measure_attention before it timed each format
    # the bf16 cache at half the f32 time streams at the bandwidth; at the f32 time, 2 bytes' worth over
    fmt = attention_fields({**attn, "decode_s_by_format": {"f32": elems * 4 / 2e10, "bf16": elems * 4 / 2e10}},
                           2e10, 1e11, 4)["kv_format_elem_s"]
    assert fmt["f32"] == pytest.approx(0.0, abs=1e-15) and fmt["bf16"] == pytest.approx(2 / 2e10, rel=1e-6)
    assert slow["score_elem_s"]["prefill"] == 0.0 and slow["prefill_score_curve"] == [[1, 0.0]]


def test_fit_recovers_overheads_and_keeps_them_non_negative():
    """fit_overheads on samples made from known coefficients gives them back (a long prefill whose
    residual is far off is not fitted); a term that would fit negative is held at 0 (an overhead
    cannot save time)."""
    from meshlm.engine_costs import OVERHEAD_TERMS, fit_overheads, overhead_fields

    rng = np.random.default_rng(1)
    truth = np.array([0.03, 2e-4, 1e-4, 3e-5, 5e-9, 8e-10])
    samples = []
    for _ in range(24):
        phase = rng.integers(2)
        Y, BV, elems = rng.choice([2, 8]), rng.choice([512, 262144]), rng.choice([1e4, 3e6])
        p, d = 1 - phase, phase
        reg = [p, p * Y, d, d * Y, BV, p * Y * elems]
        base = rng.uniform(1e-4, 1e-2)
        samples.append({"measured_s": base + float(np.dot(reg, truth)), "base_s": base, "regressors": reg,
                        "phase": "decode" if phase else "prefill", "input_len": 16})
    # a long prompt's prefill is left out of the fit (its residual is attention of another shape)
    samples.append({"measured_s": 5.0, "base_s": 0.1, "regressors": [1, 2, 0, 0, 512, 2e8], "phase": "prefill",
                    "input_len": 1024})
    fit = fit_overheads(samples)
    assert [fit[t] for t in OVERHEAD_TERMS] == pytest.approx(list(truth), rel=1e-6)
    for s in samples:  # measured less than the cost model: nothing is added
        s["measured_s"] = s["base_s"] * 0.9
    assert all(v == 0 for v in fit_overheads(samples).values())
    fields = overhead_fields(fit)
    assert fields["pass_overhead_s"] == {"prefill": fit[("pass_overhead_s", "prefill")],
                                         "decode": fit[("pass_overhead_s", "decode")]}
    assert fields["logit_elem_s"] == fit[("logit_elem_s", None)]


def test_stream_curve_never_rises_with_the_working_set(monkeypatch):
    """A smaller chain streams at least as fast as a larger one (it is its prefix): a point timed in
    a slow stretch takes the best rate at or past it; the sizes are whole weight pairs."""
    import jax

    import meshlm.calibrate as c

    call = 4 << 20
    rates = [1e9, 3e9, 2e9]  # bytes/s as timed: the smallest in a slow stretch
    monkeypatch.setattr(c, "_interleaved", lambda calls, rounds: [call / r for r in rates])
    pair = 2 * 256 * 1024  # int8 [256, 1024] + [1024, 256]
    out = c.measure_stream_curve(c._mesh(jax.devices()[:1]), 1, "int8", "f32", [pair, 2 * pair, 4 * pair + 1],
                                 (256, 1024), call, log=lambda s: None)
    assert [b for b, _ in out] == [pair, 2 * pair, 4 * pair]
    assert [r for _, r in out] == pytest.approx([3e9, 3e9, 2e9], rel=1e-12)


def test_matmul_curve_times_each_band_of_m_apart(monkeypatch):
    """The streamed (M < 256), compute-bound (256-4096) and past-the-cache (> 4096) points are timed
    in separate interleaved groups (a large call among smaller ones slows them), and each point's
    rate is its work over its own time."""
    import jax

    import meshlm.calibrate as c

    groups = []

    def timed(calls, rounds):
        groups.append(len(calls))
        return [1.0 + 0.5 * len(groups) + i for i in range(len(calls))]

    monkeypatch.setattr(c, "_interleaved", timed)
    ms = (1, 8, 256, 4096, 16384)
    E, F = 64, 128
    out = c.measure_matmul_curve(c._mesh(jax.devices()[:1]), 1, "f32", "f32", ms, 4 * 2 * E * F * 4, (E, F),
                                 log=lambda s: None)
    assert groups == [2, 2, 1]
    # the chain holds 4 pairs: streamed points run all of them, large ones max(1, min(4, 1024 // M))
    pairs = {1: 4, 8: 4, 256: 4, 4096: 1, 16384: 1}
    times = {1: 1.5, 8: 2.5, 256: 2.0, 4096: 3.0, 16384: 2.5}
    assert [m for m, _ in out] == list(ms)
    assert [r for _, r in out] == pytest.approx([4.0 * m * E * F * pairs[m] / times[m] for m in ms], rel=1e-12)
