"""Planner: enumeration, restriction by forced options, objectives, fitting, Pareto frontier."""

import pytest

from meshlm.config import preset
from meshlm.errors import MeshlmError
from meshlm.hardware import CHIPS
from meshlm.layouts import MeshShape
from meshlm.pareto import frontier_of, point_latency, sweep
from meshlm.planner import best_layout, candidate_layouts, plan

V4 = CHIPS["tpu-v4"]
PALM = preset("palm-540b")


def test_enumeration_and_restriction():
    all64 = candidate_layouts(V4, 64)
    assert len(all64) == len(V4.mesh_shapes(64)) * 4 * 2 * 2  # shared-storage FFN x attention x bf16/int8
    forced = candidate_layouts(V4, 64, ffn="ws1d", attention="batch", weights="f32", mesh=MeshShape(4, 4, 4))
    assert [str(lay) for lay in forced] == ["ws1d/batch/f32@4x4x4"]
    res = plan(PALM, V4, 64, "decode", 64, 2048, 64, ffn="wg-x")
    assert {e.ffn for e in res.candidates} == {"wg-x"}
    with pytest.raises(MeshlmError, match="not 64"):
        candidate_layouts(V4, 64, mesh=MeshShape(4, 4, 2))
    with pytest.raises(MeshlmError, match="cannot form"):
        candidate_layouts(V4, 12)
    with pytest.raises(MeshlmError, match="unknown FFN layout"):
        candidate_layouts(V4, 64, ffn="ws3d")


def test_ranking_by_objective():
    lat = plan(PALM, V4, 64, "decode", 256, 2048, 64, objective="latency")
    cost = plan(PALM, V4, 64, "decode", 256, 2048, 64, objective="cost")
    fitting = [e for e in lat.candidates if e.fits]
    assert lat.choice.latency_s == min(e.latency_s for e in fitting)
    assert cost.choice.cost_chip_ms_per_token == min(e.cost_chip_ms_per_token for e in fitting)
    assert all(e.fits for e in lat.candidates[: len(fitting)])  # fitting ones ranked first


def test_max_latency_picks_cheapest_within_limit():
    res = plan(PALM, V4, 64, "decode", 64, 2048, 64, objective="cost", max_latency=2.5)
    ok = [e for e in res.candidates if e.fits and e.latency_s <= 2.5]
    assert res.choice is not None and res.choice.cost_chip_ms_per_token == min(e.cost_chip_ms_per_token for e in ok)
    none = plan(PALM, V4, 64, "decode", 64, 2048, 64, objective="cost", max_latency=1e-3)
    assert none.choice is None


def test_nothing_fits():
    with pytest.raises(MeshlmError, match="fits on 8 x tpu-v4"):
        best_layout(PALM, V4, 8, "decode", 64, 2048, 64, weights="bf16")


def test_headline_choices():
    # [P] §4.1/4.5: decode is weight-stationary 2D with batch-sharded multiquery attention;
    # huge-batch prefill gathers weights.
    d = best_layout(PALM, V4, 64, "decode", 64, 2048, 64, weights="int8")
    p = best_layout(PALM, V4, 64, "prefill", 512, 2048, 64, objective="cost", weights="bf16")
    assert (d.ffn, d.attention) == ("ws2d", "batch")
    assert (p.ffn, p.attention) == ("wg-xyz", "batch")


def test_pareto_frontier_is_non_dominated():
    fr = sweep(preset("palm-62b"), V4, "decode", chips=(8, 16, 32), batches=(1, 8, 64, 512), gen_len=16)
    assert len(fr.frontier) >= 2
    lat = [point_latency(e) for e in fr.frontier]
    cost = [e.cost_chip_ms_per_token for e in fr.frontier]
    assert lat == sorted(lat) and cost == sorted(cost, reverse=True)
    for p in fr.points:  # nothing strictly better than a frontier point on both axes
        for f in fr.frontier:
            assert not (point_latency(p) < point_latency(f) and p.cost_chip_ms_per_token < f.cost_chip_ms_per_token)
    assert frontier_of(fr.frontier) == fr.frontier


def test_batch_enumeration_and_collectives():
    res = plan(PALM, V4, 64, "decode", [16, 64, 256], 2048, 64, objective="cost", max_latency=3.0)
    assert {e.batch for e in res.candidates} == {16, 64, 256}
    assert res.choice.latency_s <= 3.0
    ok = [e for e in res.candidates if e.fits and e.latency_s <= 3.0]
    assert res.choice.cost_chip_ms_per_token == min(e.cost_chip_ms_per_token for e in ok)
    # the choice's collectives are the executor's inventory, counted over the 64 decode steps
    kinds = {c["kind"] for c in res.collectives}
    assert {"all-gather", "reduce-scatter", "all-to-all"} <= kinds
    assert all(c["count"] % 64 == 0 and c["seconds"] > 0 for c in res.collectives)
