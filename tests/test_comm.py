"""meshlm.comm against the paper (Figure 3 volumes, App. A.2 formulas) and its own conventions."""

import pytest

from meshlm import comm
from meshlm.config import ModelConfig, preset
from meshlm.layouts import Layout, MeshShape


def _fig3_model():
    # Figure 3: X = Y = Z = 4, d_model 16384, d_ff 65536, 2-matrix MLP, bf16 volumes
    return ModelConfig(name="fig3", n_layers=1, d_model=16384, d_ff=65536, n_heads=64, n_kv_heads=64,
                       d_head=256, vocab=256, block="serial", gated_mlp=False, activation="gelu")


def _ffn_bytes(layout, tokens):
    cs = comm.forward_collectives(_fig3_model(), layout, "decode", tokens, 1, 1, act_bytes=2)
    return sum(c.bytes * c.count for c in cs if c.what.startswith("ffn.") and "norm_stats" not in c.what)


@pytest.mark.parametrize("ffn,tokens,gb", [
    ("ws2d", 2000, 0.0655), ("wg-x", 2000, 0.301), ("wg-xy", 2000, 1.08), ("wg-xyz", 2000, 4.29),
    ("ws2d", 200_000, 6.55), ("wg-x", 200_000, 3.55), ("wg-xy", 200_000, 1.89), ("wg-xyz", 200_000, 4.29),
])
def test_figure3_volumes(ffn, tokens, gb):
    m = MeshShape(4, 4, 4)
    E, F, n = 16384, 65536, 64
    got = _ffn_bytes(Layout(ffn, "heads", "bf16", m), tokens)
    N = {"wg-x": 4, "wg-xy": 16, "wg-xyz": 64}.get(ffn)
    exact = 2 * tokens * (E / 4 + F / 16) * 2 if N is None else (2 * E * F * N / n + (2 * tokens * E / N if N < n else 0)) * 2
    assert got == exact
    assert got / 1e9 == pytest.approx(gb, rel=6e-3)


def test_ws1d_moves_2BLE_and_no_middle_collectives():
    cfg = _fig3_model()
    cs = comm.forward_collectives(cfg, Layout("ws1d", "heads", "bf16", MeshShape(4, 4, 4)), "decode", 8, 1, 1)
    ffn = [c for c in cs if c.what.startswith("ffn.")]
    assert sorted(c.kind for c in ffn) == ["all-gather", "reduce-scatter"]
    assert sum(c.bytes for c in ffn) == 2 * 8 * 16384 * 2


@pytest.mark.parametrize("name,mesh,want", [
    ("tiny-palm", "2x2x2", (8, 1)), ("tiny-llama", "2x2x2", (8, 2)), ("palm-540b", "4x4x4", (64, 1)),
    ("smollm2-135m", "2x2x2", (16, 4)), ("mt-nlg-530b", "4x4x4", (128, 128)), ("falcon-7b", "2x2x2", (72, 1)),
])
def test_served_heads(name, mesh, want):
    cfg = preset(name)
    m = MeshShape.parse(mesh)
    Hs, Ks = comm.served_heads(cfg, m)
    assert (Hs, Ks) == want
    assert Hs % m.n == 0 and Hs >= cfg.n_heads and (Ks % m.n == 0 or m.n % Ks == 0)


def test_palm540b_48_heads_pad_to_64_like_the_paper():
    assert comm.served_heads(preset("palm-540b").replace(n_heads=48), MeshShape(4, 4, 4)) == (64, 1)


def test_batch_padding_rule():
    m = MeshShape(2, 2, 2)
    assert comm.batch_multiple(Layout("ws2d", "heads", "f32", m)) == 1
    assert comm.batch_multiple(Layout("wg-x", "heads", "f32", m)) == 2
    assert comm.batch_multiple(Layout("wg-xy", "heads", "f32", m)) == 4
    assert comm.batch_multiple(Layout("ws2d", "batch", "f32", m)) == 8
    assert comm.padded_batch(3, Layout("ws2d", "batch", "f32", m)) == 8


def test_mqa_batch_cache_is_one_nth_of_heads_baseline():
    cfg, m = preset("palm-62b"), MeshShape(4, 4, 4)
    heads = comm.kv_cache_bytes_per_device(cfg, Layout("ws2d", "heads", "bf16", m), 64, 2048)
    batch = comm.kv_cache_bytes_per_device(cfg, Layout("ws2d", "batch", "bf16", m), 64, 2048)
    assert heads == 2 * 64 * 64 * 2048 * 256 * 2  # the single KV head replicated on every chip
    assert batch * 64 == heads


def test_parallel_block_has_half_the_reduce_scatters_of_serial():
    m = MeshShape(2, 2, 2)
    lay = Layout("ws2d", "heads", "bf16", m)
    par = preset("tiny-palm")
    ser = par.replace(block="serial")
    n_rs = {c.what: c.count for c in comm.forward_collectives(par, lay, "decode", 8, 1, 16)
            if c.kind == "reduce-scatter" and c.what.startswith("block")}
    n_rs_ser = [c for c in comm.forward_collectives(ser, lay, "decode", 8, 1, 16)
                if c.kind == "reduce-scatter" and not c.what.startswith("embed")]
    assert sum(n_rs.values()) == 2 * par.n_layers and len(n_rs_ser) == 4


def test_collective_matmul_moves_k_minus_1_over_k_of_the_gather():
    cfg, m = preset("tiny-llama"), MeshShape(2, 2, 2)
    plain = comm.forward_collectives(cfg, Layout("ws2d", "heads", "f32", m), "decode", 8, 1, 16, 4)
    loop = comm.forward_collectives(cfg, Layout("ws2d", "heads", "f32", m, collective_matmul=True), "decode", 8, 1, 16, 4)
    ag = sum(c.bytes * c.count for c in plain if c.what.endswith("act_gather") or c.what.endswith("out.reduce_scatter"))
    cp = comm.totals(loop)["collective-permute"]
    assert cp == ag * 3 / 4


def test_totals_has_every_kind():
    t = comm.totals([])
    assert list(t) == list(comm.COLLECTIVE_KINDS) and all(v == 0 for v in t.values())


def test_weight_bytes_int8_about_a_quarter_of_f32():
    cfg, m = preset("smollm2-135m"), MeshShape(2, 2, 2)
    f32 = comm.weight_bytes_per_device(cfg, Layout("ws2d", "heads", "f32", m))
    i8 = comm.weight_bytes_per_device(cfg, Layout("ws2d", "heads", "int8", m))
    assert 0.25 < i8 / f32 < 0.27
