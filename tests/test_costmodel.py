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


# ---- calibrated local chips: the measured M-curve, overheads, engine accounting -------------------
def calibrated(**kw):
    """A one-device CPU-like spec with every measured field (values chosen to be easy to check)."""
    import dataclasses

    base = dataclasses.replace(CHIPS["a100-80g"], name="local", flops_efficiency=1.0, hbm_efficiency=1.0,
                               peak_flops=4e11, hbm_bw=3e10, act_bytes=4, vendor_peaks=())
    return dataclasses.replace(base, **kw)


CURVE = (("f32", ((1, 1e10), (16, 5e10), (256, 2e11), (4096, 3e11))),)
ONE = MeshShape(1, 1, 1)


def test_presets_have_no_measured_terms():
    cfg = preset("palm-540b")
    e = estimate(cfg, V4, Layout("ws2d", "heads", "int8", M444), "prefill", 1, 2048, 1)
    assert e.breakdown["overhead"] == 0 and e.breakdown["score_load"] == 0 and e.breakdown["kv_extra"] == 0


def test_last_position_logits_drop_the_output_projection_of_the_other_positions():
    cfg = preset("smollm2-135m")
    lay = Layout("ws2d", "heads", "bf16", MeshShape(2, 2, 4))
    B, L = 3, 512
    every, last = (estimate(cfg, V4, lay, "prefill", B, L, 1, logits=lg) for lg in ("all", "last"))
    n_out = cfg.vocab * cfg.d_model  # V x E multiplies B tokens instead of B x L
    saved = 2 * n_out * B * (L - 1) / 16 / V4.flops
    assert every.breakdown["matmul"] - last.breakdown["matmul"] == pytest.approx(saved, rel=1e-9)
    assert every.breakdown["weight_load"] == last.breakdown["weight_load"]  # V x E is still read once
    d = [estimate(cfg, V4, lay, "decode", B, L, 4, logits=lg).latency_s for lg in ("all", "last")]
    assert d[0] == d[1]  # decode projects one position either way
    with pytest.raises(MeshlmError, match="logits"):
        estimate(cfg, V4, lay, "prefill", B, L, 1, logits="first")


def test_matmuls_are_priced_on_the_measured_curve_at_their_rows():
    cfg = preset("palm-62b")
    chip = calibrated(matmul_curve=CURVE)
    lay = Layout("ws2d", "heads", "f32", ONE)
    n_mm = cfg.n_params() - (0 if cfg.tie_embeddings else cfg.vocab * cfg.d_model)
    n_out = cfg.vocab * cfg.d_model
    B, L = 4, 64  # body rows 256 -> 2e11; last-position logits rows 4 -> halfway (log M) 1 to 16
    p = estimate(cfg, chip, lay, "prefill", B, L, 1, logits="last")
    hand = 2 * (n_mm - n_out) * B * L / 2e11 + 2 * n_out * B / 3e10
    assert p.breakdown["matmul"] == pytest.approx(hand, rel=1e-9)
    d = estimate(cfg, chip, lay, "decode", 16, 100, 1)
    assert d.breakdown["matmul"] == pytest.approx(2 * n_mm * 16 / 5e10, rel=1e-9)
    # a format without a curve keeps the flat rate
    i8 = estimate(cfg, chip, Layout("ws2d", "heads", "int8", ONE), "decode", 16, 100, 1)
    assert i8.breakdown["matmul"] == pytest.approx(2 * n_mm * 16 / 4e11, rel=1e-9)


def test_a_working_set_in_cache_streams_at_the_stream_curves_rate():
    """A model whose weights fit the last-level cache: its decode matmuls and weight reads are priced
    at the stream curve's rate for its working set, not at the matmul curve's 1 GiB chain."""
    import math

    from meshlm.costmodel import weight_read_bytes

    cfg = preset("smollm2-135m")
    i8 = (("int8", ((1, 2e10), (64, 1e11))),)
    plain = calibrated(matmul_curve=i8)
    chip = calibrated(matmul_curve=i8, matmul_curve_bytes=float(1 << 30),
                      stream_curve=(("int8", ((16 << 20, 4e10), (1 << 30, 2e10))),))
    lay = Layout("ws2d", "heads", "int8", ONE)
    W = weight_read_bytes(cfg, lay)
    s = 4e10 + (2e10 - 4e10) * math.log(W / (16 << 20)) / math.log(64)  # the curve at W bytes (log bytes)
    n_mm = cfg.n_params() - (0 if cfg.tie_embeddings else cfg.vocab * cfg.d_model)
    d = forward_pass(cfg, chip, lay, "decode", 1, 1, 128, 0.0)
    assert d.matmul_s == pytest.approx(2 * n_mm * (2 / 2e10 + 1 / s - 1 / 2e10) / 2, rel=1e-9)
    assert d.weight_mem_s == pytest.approx(W / (3e10 * s / 2e10), rel=1e-9)
    base = forward_pass(cfg, plain, lay, "decode", 1, 1, 128, 0.0)
    assert base.matmul_s == pytest.approx(2 * n_mm / 2e10, rel=1e-9) and d.matmul_s < 0.9 * base.matmul_s
    # the cache is part of the working set: a larger one streams slower
    assert forward_pass(cfg, chip, lay, "decode", 1, 1, 128, 512e6).matmul_s > d.matmul_s
    # prefill at 4096 rows is compute-bound on either spec; a model past the chain is unchanged
    p = [forward_pass(cfg, c, lay, "prefill", 8, 512, 512, 0.0).matmul_s for c in (chip, plain)]
    assert p[0] == pytest.approx(p[1], rel=1e-12)
    big, big_lay = preset("palm-62b"), Layout("ws2d", "heads", "int8", ONE)
    assert (forward_pass(big, chip, big_lay, "decode", 1, 1, 128, 0.0).matmul_s
            == forward_pass(big, plain, big_lay, "decode", 1, 1, 128, 0.0).matmul_s)


def test_weight_gathered_matmul_rows_are_the_chips_batch_share():
    cfg = preset("palm-62b")
    chip = calibrated(matmul_curve=CURVE)
    m = MeshShape(2, 2, 4)
    p = estimate(cfg, chip, Layout("wg-xyz", "batch", "f32", m), "prefill", 16, 16, 1)  # 256 tokens / 16 chips
    n_mm = cfg.n_params() - (0 if cfg.tie_embeddings else cfg.vocab * cfg.d_model)
    assert p.breakdown["matmul"] == pytest.approx(2 * n_mm * 256 / 16 / 5e10, rel=1e-9)


def test_overheads_and_scores_add_to_the_pass():
    cfg = preset("palm-62b")
    terms = dict(pass_overhead_s=(("prefill", 0.03), ("decode", 0.002)),
                 layer_overhead_s=(("prefill", 1e-4), ("decode", 2e-5)), logit_elem_s=1e-9,
                 score_elem_s=(("prefill", 5e-9), ("decode", 7e-9)), kv_elem_s=(("prefill", 2e-10), ("decode", 3e-10)),
                 act_elem_s=(("prefill", 8e-10),))
    plain, chip = calibrated(), calibrated(**terms)
    lay = Layout("ws2d", "heads", "f32", ONE)
    Y, V, H = cfg.n_layers, cfg.vocab, cfg.n_heads
    B, L = 2, 128
    pre = [estimate(cfg, c, lay, "prefill", B, L, 1) for c in (plain, chip)]
    E, F, D, K = cfg.d_model, cfg.d_ff, cfg.d_head, cfg.n_kv_heads
    # activations a layer writes per token: norm in, q|k|v, attention out, residual + norm, gate|up, h, residual
    act = B * L * Y * (E + (H + 2 * K) * D + H * D + 2 * E + 3 * F + E)
    over = 0.03 + Y * 1e-4 + 1e-9 * B * V + 8e-10 * act  # decode has no activation term
    score = 5e-9 * B * L * L * H * Y
    kv_elems = lambda S: 2 * Y * B * S * cfg.n_kv_heads * cfg.d_head  # K and V, f32 (act_bytes 4)
    assert pre[1].breakdown["overhead"] == pytest.approx(over, rel=1e-12)
    assert pre[1].breakdown["score_load"] == pytest.approx(score, rel=1e-12)
    assert pre[1].breakdown["kv_extra"] == pytest.approx(2e-10 * kv_elems(L), rel=1e-12)
    assert pre[1].latency_s - pre[0].latency_s == pytest.approx(over + score + 2e-10 * kv_elems(L), rel=1e-9)
    dec = [estimate(cfg, c, lay, "decode", B, L, 8) for c in (plain, chip)]
    s_mean = L + 4.5  # the mean context over 8 steps
    step = 0.002 + Y * 2e-5 + 1e-9 * B * V + 7e-9 * B * s_mean * H * Y + 3e-10 * kv_elems(s_mean)
    assert dec[1].step_latency_s - dec[0].step_latency_s == pytest.approx(step, rel=1e-9)
    b = pre[1].breakdown
    assert pre[1].latency_s == pytest.approx(max(b["matmul"], b["weight_load"]) + max(b["attention"], b["kv_load"])
                                             + b["score_load"] + b["kv_extra"] + b["communication"] + b["overhead"])


def test_prefill_score_cost_is_read_at_the_sequences_per_chip():
    """With a measured prefill_score_curve the per-score cost is the curve's at the batch each chip
    attends over (log-interpolated), not the batch-1 score_elem_s."""
    cfg = preset("palm-62b")
    Y, H, L = cfg.n_layers, cfg.n_heads, 128
    chip = calibrated(score_elem_s=(("prefill", 4e-9),), prefill_score_curve=((1, 4e-9), (4, 1e-9)))
    one = Layout("ws2d", "heads", "f32", ONE)
    for B, per_score in ((1, 4e-9), (2, 2.5e-9), (4, 1e-9), (16, 1e-9)):
        p = estimate(cfg, chip, one, "prefill", B, L, 1)
        assert p.breakdown["score_load"] == pytest.approx(per_score * B * L * L * H * Y, rel=1e-9)
    # 8 sequences over a batch split of 8 chips: one sequence per chip, batch 1's cost
    split = Layout("wg-xyz", "batch", "f32", MeshShape(2, 2, 2))
    p = estimate(cfg, chip, split, "prefill", 8, L, 1)
    assert p.breakdown["score_load"] == pytest.approx(4e-9 * 8 * L * L * H * Y / 8, rel=1e-9)


def test_kv_cache_format_sets_the_bytes_read_held_and_the_measured_extra():
    """A bf16 cache on an f32 (act_bytes 4) chip: half the KV bytes read per step, half the cache
    held, and the calibrated per-element extra (measured on an f32 cache) priced per byte; an f32
    cache on a bf16 accelerator doubles them."""
    cfg = preset("palm-62b")
    chip = calibrated(kv_elem_s=(("decode", 3e-10),))
    f32, bf16 = (estimate(cfg, chip, Layout("ws2d", "heads", "f32", ONE, kv_cache=kv), "decode", 8, 1024, 16)
                 for kv in (None, "bf16"))
    for term in ("kv_load", "kv_extra"):
        assert bf16.breakdown[term] == pytest.approx(f32.breakdown[term] / 2, rel=1e-12) and f32.breakdown[term] > 0
    assert bf16.memory["kv_cache"] == pytest.approx(f32.memory["kv_cache"] / 2, rel=1e-12)
    assert bf16.memory["weights"] == f32.memory["weights"] and bf16.latency_s < f32.latency_s
    same = estimate(cfg, chip, Layout("ws2d", "heads", "f32", ONE, kv_cache="f32"), "decode", 8, 1024, 16)
    assert same.latency_s == f32.latency_s  # f32 is this chip's activation dtype anyway
    tpu = [estimate(cfg, V4, Layout("ws2d", "batch", "bf16", MeshShape(2, 2, 2), kv_cache=kv), "decode", 64, 2048, 8)
           for kv in (None, "f32")]
    assert tpu[1].memory["kv_cache"] == pytest.approx(2 * tpu[0].memory["kv_cache"], rel=1e-12)


def test_a_per_format_measured_extra_replaces_the_per_byte_one():
    """calibrate times the decode attention on each cache format: a bf16 cache is priced at its
    own seconds per element (here 3x the f32 one, though it streams half the bytes), an f32 cache
    at the f32 one, and prefill keeps kv_elem_s."""
    cfg = preset("palm-62b")
    chip = calibrated(kv_elem_s=(("prefill", 1e-10), ("decode", 3e-10)),
                      kv_format_elem_s=(("f32", 1e-11), ("bf16", 3e-11)))
    f32, bf16 = (estimate(cfg, chip, Layout("ws2d", "heads", "f32", ONE, kv_cache=kv), "decode", 8, 1024, 16)
                 for kv in (None, "bf16"))
    assert bf16.breakdown["kv_extra"] == pytest.approx(3 * f32.breakdown["kv_extra"], rel=1e-12)
    assert f32.breakdown["kv_extra"] > 0
    elems = f32.breakdown["kv_load"] * chip.hbm_bw / 4  # the f32 cache's elements read per step
    assert f32.breakdown["kv_extra"] == pytest.approx(1e-11 * elems, rel=1e-12)
    per_byte = estimate(cfg, calibrated(kv_elem_s=(("decode", 3e-10),)),
                        Layout("ws2d", "heads", "f32", ONE, kv_cache="bf16"), "decode", 8, 1024, 16)
    assert per_byte.breakdown["kv_extra"] == pytest.approx(3e-10 * elems / 2, rel=1e-12)
    with pytest.raises(MeshlmError, match="kv_format_elem_s"):
        calibrated(kv_format_elem_s=(("int8", 1e-11),))


def test_layout_kv_cache_format_is_checked_and_shown():
    lay = Layout("ws2d", "heads", "int8", ONE, kv_cache="bf16")
    assert str(lay).endswith("+kv-bf16") and lay.to_dict()["kv_cache"] == "bf16" and lay.short == "ws2d/heads"
    assert "+kv" not in str(Layout("ws2d", "heads", "int8", ONE))
    with pytest.raises(MeshlmError, match="KV cache format 'int8'"):
        Layout("ws2d", "heads", "int8", ONE, kv_cache="int8")
