"""Cost-model formulas, each against a hand calculation written here."""

import pytest

from meshlm import comm
from meshlm.config import preset
from meshlm.costmodel import collective_time, estimate, forward_pass, memory_per_chip
from meshlm.errors import MeshlmError
from meshlm.hardware import CHIPS
from meshlm.layouts import Layout, MeshShape

V4 = CHIPS["tpu-v4"]
M444 = MeshShape(4, 4, 4)


def kv_hand(n_layers, batch_per_chip, seq, kv_heads_per_chip, d_head, nbytes=2):
    return 2 * n_layers * batch_per_chip * seq * kv_heads_per_chip * d_head * nbytes


@pytest.mark.parametrize("model, attention, mesh, batch, per_chip_batch, per_chip_heads", [
    ("llama-3-70b", "batch", M444, 64, 1, 8),  # GQA, 8 KV heads, sequences split 64 ways
    ("llama-3-70b", "heads", MeshShape(1, 2, 4), 4, 4, 1),  # 8 KV heads over 8 chips
    ("mt-nlg-530b", "heads", M444, 8, 8, 2),  # MHA: 128 heads over 64 chips
    ("palm-540b", "heads", M444, 8, 8, 1),  # MQA over heads: the one K/V head on every chip
    ("palm-540b", "batch", M444, 128, 2, 1),  # MQA over batch: 1/64 of the cache per chip
])
def test_kv_cache_bytes(model, attention, mesh, batch, per_chip_batch, per_chip_heads):
    cfg = preset(model)
    lay = Layout("ws2d", attention, "bf16", mesh)
    mem = memory_per_chip(cfg, lay, "decode", batch, 1000, 24)
    assert mem["kv_cache"] == kv_hand(cfg.n_layers, per_chip_batch, 1024, per_chip_heads, cfg.d_head)


def test_llama_70b_kv_per_token_is_gqa():
    cfg = preset("llama-3-70b")  # 80 layers x 8 KV heads x 128 x K,V x bf16 = 320 KiB per token
    lay = Layout("ws2d", "heads", "bf16", MeshShape(1, 1, 1))
    assert comm.kv_cache_bytes_per_device(cfg, lay, 1, 1) == 2 * 80 * 8 * 128 * 2 == 327_680


def palm_62b_params():
    E, F, H, D, K, L, V = 8192, 32768, 32, 256, 1, 64, 256_000
    per_layer = 2 * E * H * D + 2 * E * K * D + 3 * E * F + E  # q,o + k,v + SwiGLU + one LayerNorm scale
    return L * per_layer + V * E + E


def test_prefill_compute_time():
    cfg = preset("palm-62b")
    lay = Layout("ws2d", "heads", "bf16", MeshShape(2, 2, 4))
    p = forward_pass(cfg, V4, lay, "prefill", 1, 2048, 2048, 0.0)
    flops = 275e12 * V4.flops_efficiency
    assert palm_62b_params() == cfg.n_params()
    assert p.matmul_s == pytest.approx(2 * palm_62b_params() * 2048 / 16 / flops, rel=1e-12)
    assert p.attn_s == pytest.approx(4 * 2048 * 2048 * 32 * 256 * 64 / 16 / flops, rel=1e-12)


def test_collective_time_is_app_a1():
    lay = Layout("ws2d", "batch", "bf16", M444)
    bw_s, lat_s = collective_time(V4, lay, "all-gather", "yz", 1e6)
    assert bw_s == pytest.approx(1e6 / 90e9 * 15 / 16)  # D / bw * (K-1)/K, one axis of links
    assert lat_s == pytest.approx(6 * V4.hop_latency_s)  # two rings of 4: 3 + 3 steps
    ar_bw, ar_lat = collective_time(V4, lay, "all-reduce", "x", 1e6)
    ag_bw, ag_lat = collective_time(V4, lay, "all-gather", "x", 1e6)
    assert (ar_bw, ar_lat) == pytest.approx((2 * ag_bw, 2 * ag_lat))  # all-reduce = RS + AG
    assert collective_time(V4, Layout("ws2d", "batch", "bf16", MeshShape(1, 8, 8)), "all-gather", "x", 1e6) == (0, 0)


def test_decode_closed_form_equals_sum_of_steps():
    cfg = preset("palm-62b")
    lay = Layout("ws2d", "batch", "int8", MeshShape(2, 2, 4))
    B, S0, G = 32, 100, 7
    e = estimate(cfg, V4, lay, "decode", B, S0, G)
    total = 0.0
    for t in range(G):
        s = S0 + t + 1
        kv = comm.kv_cache_bytes_per_device(cfg, lay, B, s)
        total += forward_pass(cfg, V4, lay, "decode", B, 1, s, kv).total_s
    assert e.latency_s == pytest.approx(total, rel=1e-9)
    assert e.step_latency_s == pytest.approx(total / G, rel=1e-9)


def test_mfu_and_cost_definitions():
    cfg = preset("palm-540b")
    e = estimate(cfg, V4, Layout("ws2d", "batch", "int8", M444), "decode", 64, 2048, 64)
    assert cfg.n_params_mfu == pytest.approx(540.35e9, rel=1e-3)  # unpadded, as the paper reports
    assert e.mfu == pytest.approx(2 * cfg.n_params_mfu * 64 * 64 / (e.latency_s * 64 * 275e12))
    assert e.cost_chip_ms_per_token == pytest.approx(64 * e.step_latency_s / 64 * 1e3)
    p = estimate(cfg, V4, Layout("ws2d", "heads", "int8", M444), "prefill", 1, 2048, 64)
    assert p.step_latency_s == p.latency_s
    assert p.cost_chip_ms_per_token == pytest.approx(64 * p.latency_s / 2048 * 1e3)


def test_latency_combination():
    cfg = preset("palm-540b")
    e = estimate(cfg, V4, Layout("ws2d", "batch", "bf16", M444), "prefill", 4, 128, 1)
    b = e.breakdown
    assert e.latency_s == pytest.approx(max(b["matmul"], b["weight_load"]) + max(b["attention"], b["kv_load"])
                                        + b["communication"])
    assert b["compute"] == pytest.approx(b["matmul"] + b["attention"])
    assert b["communication"] == pytest.approx(b["comm_bandwidth"] + b["comm_latency"])


def test_int8_halves_weight_loading():
    cfg = preset("palm-540b")
    est = {w: estimate(cfg, V4, Layout("ws2d", "batch", w, M444), "decode", 64, 2048, 8) for w in ("bf16", "int8")}
    ratio = est["int8"].breakdown["weight_load"] / est["bf16"].breakdown["weight_load"]
    assert 0.5 <= ratio < 0.51  # 1 byte per weight, plus f32 per-channel scales
    assert est["int8"].breakdown["matmul"] == est["bf16"].breakdown["matmul"]  # bf16 MXU either way


def test_fits_verdict():
    cfg = preset("palm-540b")
    small = estimate(cfg, V4, Layout("ws2d", "batch", "bf16", MeshShape(2, 2, 2)), "decode", 8, 2048, 64)
    big = estimate(cfg, V4, Layout("ws2d", "batch", "bf16", M444), "decode", 8, 2048, 64)
    assert small.memory["weights"] > 32 * 2**30 and not small.fits
    assert big.fits and big.memory_per_chip_bytes == pytest.approx(sum(big.memory.values()))


def test_mqa_heads_layout_reloads_the_whole_cache_per_chip():
    cfg = preset("palm-540b")
    kv = {a: estimate(cfg, V4, Layout("ws2d", a, "bf16", M444), "decode", 64, 2048, 64).breakdown["kv_load"]
          for a in ("heads", "batch")}
    assert kv["heads"] == pytest.approx(64 * kv["batch"])


@pytest.mark.parametrize("kw, msg", [({"batch": 0}, "batch"), ({"input_len": -1}, "input length"),
                                     ({"gen_len": 0}, "generated length"), ({"phase": "train"}, "phase")])
def test_bad_workload(kw, msg):
    args = dict(phase="decode", batch=1, input_len=8, gen_len=8) | kw
    with pytest.raises(MeshlmError, match=msg):
        estimate(preset("tiny-palm"), V4, Layout("ws2d", "batch", "bf16", MeshShape(2, 2, 2)), **args)


@pytest.mark.parametrize("ffn, attention, batch", [("ws2d", "batch", 100), ("wg-xy", "heads", 37), ("wg-xyz", "batch", 3),
                                                   ("ws1d", "heads", 5), ("wg-x", "batch", 1000)])
def test_batch_interpolation_is_exact(ffn, attention, batch):
    # the planner prices comm at two batch multiples and interpolates; it must equal a direct call
    from meshlm.costmodel import _comm_totals, _kv_bytes_at, comm_totals, kv_bytes

    cfg = preset("llama-3-70b")
    lay = Layout(ffn, attention, "bf16", M444)
    assert comm_totals(cfg, V4, lay, "prefill", batch, 128, 128) == pytest.approx(
        _comm_totals(cfg, V4, lay, "prefill", batch, 128, 128), rel=1e-12)
    assert kv_bytes(cfg, lay, batch, 300) == pytest.approx(_kv_bytes_at(cfg, lay, batch, 300), rel=1e-12)
