"""Chip specs: presets, JSON specs (CPU hosts from `meshlm calibrate`), bandwidth conventions."""

import json

import pytest

from meshlm.errors import MeshlmError
from meshlm.hardware import CHIPS, GiB, chip_from_dict, load_chip, save_chip
from meshlm.layouts import MeshShape


def test_tpu_v4_is_the_papers_chip():
    c = load_chip("tpu-v4")
    assert (c.peak_flops, c.hbm_bytes, c.hbm_bw) == (275e12, 32 * GiB, 1.2e12)
    assert c.chip_link_bw == 270e9  # [P] §4: 270 GB/s per chip = 6 links x 45 GB/s
    assert c.topology == "3d-torus" and "peak_flops" in c.vendor_peaks


def test_every_preset_is_consistent():
    for name, c in CHIPS.items():
        assert c.name == name
        assert 0 < c.flops < c.peak_flops and 0 < c.mem_bw < c.hbm_bw
        assert set(c.vendor_peaks) <= set(c.to_dict())


def test_torus_collective_bandwidth_is_one_axis_of_links():
    c = CHIPS["tpu-v4"]
    m = MeshShape(4, 4, 4)
    # sequential rings per axis: any group runs at one axis's two links (2 x 45 GB/s)
    assert c.group_bw(m, "x") == c.group_bw(m, "yz") == c.group_bw(m, "xyz") == 90e9
    assert c.group_bw(MeshShape(1, 8, 8), "x") == float("inf")  # size-1 group moves nothing
    assert c.ring_steps(m, "yz") == 6 and c.ring_steps(m, "xyz") == 9
    assert c.ring_factor(m, "yz") == pytest.approx(15 / 16)
    assert c.ring_factor(MeshShape(2, 2, 4), "z") == 1.0  # below 64 chips: no wraparound


def test_nvlink_switch_domain():
    h = CHIPS["h100-sxm"]
    assert h.group_bw(MeshShape(1, 2, 4), "yz") == 450e9
    m = MeshShape(2, 2, 4)  # 16 GPUs: z and y stay in one 8-GPU node, x crosses nodes
    assert h.group_bw(m, "yz") == 450e9 and h.group_bw(m, "x") == 50e9
    assert h.ring_steps(m, "xyz") == 15


def test_v4_slices():
    c = CHIPS["tpu-v4"]
    assert [str(m) for m in c.mesh_shapes(8)] == ["2x2x2"]
    assert sorted(str(m) for m in c.mesh_shapes(16)) == ["2x2x4", "2x4x2", "4x2x2"]
    assert MeshShape(4, 4, 4) in c.mesh_shapes(64) and MeshShape(1, 8, 8) not in c.mesh_shapes(64)
    assert c.mesh_shapes(12) == []
    assert len(CHIPS["h100-sxm"].mesh_shapes(8)) == len(MeshShape.all_for(8))


def test_json_round_trip_and_cpu_host(tmp_path):
    p = tmp_path / "h.json"
    save_chip(CHIPS["a100-80g"], p)
    assert load_chip(str(p)) == CHIPS["a100-80g"]
    host = {"name": "cpu-host", "peak_flops": 2e11, "hbm_bytes": 24 * GiB, "hbm_bw": 2.5e10, "link_bw": 1e10,
            "topology": "switch", "switch_domain": 8, "vendor_peaks": []}
    p.write_text(json.dumps(host))
    c = load_chip(str(p))
    assert c.name == "cpu-host" and c.group_bw(MeshShape(2, 2, 2), "xyz") == 1e10


@pytest.mark.parametrize("bad, msg", [
    ("[1, 2]", "JSON object"),
    ('{"name": "a"}', "missing field"),
    ('{"name": "a", "peak_flops": 1, "hbm_bytes": 1, "hbm_bw": 1, "link_bw": 1, "topology": "ring"}', "topology"),
    ('{"name": "a", "peak_flops": -1, "hbm_bytes": 1, "hbm_bw": 1, "link_bw": 1, "topology": "switch", '
     '"switch_domain": 1}', "peak_flops"),
    ('{"name": "a", "colour": 1}', "unknown field"),
    ("{not json", "cannot read"),
])
def test_malformed_specs(tmp_path, bad, msg):
    p = tmp_path / "bad.json"
    p.write_text(bad)
    with pytest.raises(MeshlmError, match=msg):
        load_chip(str(p))


def test_unknown_chip():
    with pytest.raises(MeshlmError, match="unknown chip"):
        load_chip("tpu-v99")
    with pytest.raises(MeshlmError):
        chip_from_dict({"name": "x", "peak_flops": "fast", "hbm_bytes": 1, "hbm_bw": 1, "link_bw": 1,
                        "topology": "3d-torus", "torus_dims": 3})


def test_local_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHLM_HOME", str(tmp_path))
    with pytest.raises(MeshlmError, match="meshlm calibrate"):
        load_chip("local")
    save_chip(CHIPS["h200"], tmp_path / "local.json")
    assert load_chip("local") == CHIPS["h200"]


MEASURED = {"matmul_curve": {"f32": [[1, 1e10], [4, 4e10], [64, 2e11]], "int8": [[1, 2e10], [64, 1e11]]},
            "pass_overhead_s": {"prefill": 0.03, "decode": 0.001}, "layer_overhead_s": {"prefill": 1e-4, "decode": 2e-5},
            "logit_elem_s": 1e-9, "score_elem_s": {"prefill": 5e-9, "decode": 8e-9},
            "kv_elem_s": {"prefill": 1e-10, "decode": 2e-10}, "act_elem_s": {"prefill": 8e-10},
            "prefill_score_curve": [[1, 4e-9], [4, 1e-9]], "kv_format_elem_s": {"f32": 1e-11, "bf16": 3e-11},
            "matmul_curve_bytes": 1 << 30, "stream_curve": {"int8": [[16 << 20, 4e10], [1 << 30, 2e10]]}}
HOST = {"name": "cpu-host", "peak_flops": 2e11, "hbm_bytes": 24 * GiB, "hbm_bw": 2.5e10, "link_bw": 1e10,
        "topology": "switch", "switch_domain": 1, "vendor_peaks": [], "flops_efficiency": 1.0, "hbm_efficiency": 1.0}


def test_matmul_curve_interpolates_in_log_m():
    c = chip_from_dict({**HOST, **MEASURED})
    assert c.matmul_rate("f32", 2) == pytest.approx(2.5e10)  # halfway between M=1 and 4 in log M (linear M: 2e10)
    assert c.matmul_rate("f32", 16) == pytest.approx(4e10 + (2e11 - 4e10) / 2)  # 16 is halfway from 4 to 64
    assert c.matmul_rate("f32", 4) == 4e10
    assert c.matmul_rate("f32", 0.5) == 1e10 and c.matmul_rate("f32", 1e6) == 2e11  # clamped to the ends
    assert c.matmul_rate("int8", 8) == pytest.approx(2e10 + (1e11 - 2e10) / 2)
    assert c.matmul_rate("bf16", 8) == c.flops_for("bf16") == 2e11  # no curve: the flat rate
    assert CHIPS["tpu-v4"].matmul_rate("bf16", 1) == CHIPS["tpu-v4"].flops  # presets: the paper's rate
    assert c.overhead_s("prefill", 30) == pytest.approx(0.03 + 30 * 1e-4)
    assert c.overhead_s("decode", 2) == pytest.approx(0.001 + 2 * 2e-5)
    assert CHIPS["h100-sxm"].overhead_s("decode", 80) == 0
    # prefill's cost per score by sequences per chip (log batch), clamped; decode keeps score_elem_s
    assert c.score_elem("prefill", 2) == pytest.approx(2.5e-9) and c.score_elem("prefill", 1) == 4e-9
    assert c.score_elem("prefill", 0.5) == 4e-9 and c.score_elem("prefill", 64) == 1e-9
    assert c.score_elem("decode", 2) == 8e-9
    without = chip_from_dict({**HOST, **{k: v for k, v in MEASURED.items() if k != "prefill_score_curve"}})
    assert without.score_elem("prefill", 4) == 5e-9 and CHIPS["tpu-v4"].score_elem("prefill", 4) == 0


def test_stream_curve_moves_the_streaming_share_of_the_matmul_curve():
    """Per weight, the curve's time 2m/rate less what streaming a byte cost at the curve's chain
    (1 GiB: 2e10 B/s) plus what it costs at the pass's working set; floored at the largest M's rate."""
    c = chip_from_dict({**HOST, **MEASURED})
    at = lambda m, rate, s: 2 * m / (2 * m / rate + 1 / s - 1 / 2e10)  # int8: one byte per weight
    assert c.matmul_rate("int8", 1, 16 << 20) == pytest.approx(at(1, 2e10, 4e10), rel=1e-12)  # 2.67e10
    assert c.matmul_rate("int8", 1, 128 << 20) == pytest.approx(at(1, 2e10, 3e10), rel=1e-12)  # halfway in log bytes
    assert c.matmul_rate("int8", 8, 16 << 20) == pytest.approx(at(8, c.matmul_rate("int8", 8), 4e10), rel=1e-12)
    for s in (1 << 30, 8 << 30, None):  # at or past the chain's working set (clamped), or none given: the curve
        assert c.matmul_rate("int8", 1, s) == c.matmul_rate("int8", 1) == 2e10
    assert c.matmul_rate("int8", 64, 16 << 20) == 1e11  # compute-bound: never past the curve's best rate
    # a curve whose largest M reads below its best (Zen 4 int8: 201 GFLOP/s at M = 128, 183 at 4096):
    # the bound is the best rate, and a working set at the chain's size leaves the curve as it is
    dip = chip_from_dict({**HOST, **MEASURED, "matmul_curve": {"int8": [[1, 2e10], [16, 1.2e11], [4096, 1e11]]}})
    assert dip.matmul_rate("int8", 16, 1 << 30) == 1.2e11 and dip.matmul_rate("int8", 16, 16 << 20) == 1.2e11
    assert dip.matmul_rate("int8", 4096, 16 << 20) == pytest.approx(2 * 4096 / (2 * 4096 / 1e11 - 1 / 4e10))
    assert c.matmul_rate("f32", 1, 16 << 20) == 1e10  # no stream curve for f32: unchanged
    # the weights' own bandwidth term scales with the stream curve the same way
    assert c.weight_bw("int8", 16 << 20) == pytest.approx(2 * 2.5e10) and c.weight_bw("int8", 1 << 30) == 2.5e10
    assert c.weight_bw("f32", 16 << 20) == c.weight_bw("int8") == 2.5e10


def test_measured_fields_round_trip_and_old_specs_load(tmp_path):
    p = tmp_path / "local.json"
    c = chip_from_dict({**HOST, **MEASURED})
    save_chip(c, p)
    assert load_chip(str(p)) == c
    on_disk = json.loads(p.read_text())
    assert on_disk["matmul_curve"]["int8"] == [[1, 2e10], [64, 1e11]] and on_disk["pass_overhead_s"]["decode"] == 0.001
    assert on_disk["kv_format_elem_s"] == {"f32": 1e-11, "bf16": 3e-11}
    assert on_disk["stream_curve"] == {"int8": [[16 << 20, 4e10], [1 << 30, 2e10]]}
    assert on_disk["matmul_curve_bytes"] == 1 << 30
    p.write_text(json.dumps(HOST))  # a spec written before these fields existed
    old = load_chip(str(p))
    assert old.matmul_curve == () and old.overhead_s("prefill", 30) == 0 and old.logit_elem_s == 0
    assert old.stream_curve == () and old.matmul_curve_bytes == 0
    # a preset's JSON has none of them (what `meshlm paper` prices is unchanged)
    assert not {"matmul_curve", "pass_overhead_s", "layer_overhead_s", "logit_elem_s", "score_elem_s", "kv_elem_s",
                "act_elem_s", "prefill_score_curve", "kv_format_elem_s", "matmul_curve_bytes", "stream_curve"} & set(
        CHIPS["tpu-v4"].to_dict())


@pytest.mark.parametrize("field, value, msg", [
    ("matmul_curve", {"f32": [[4, 1e10], [1, 2e10]]}, "increasing"),
    ("matmul_curve", {"f32": [[1, -1.0]]}, "positive"),
    ("matmul_curve", {"f32": 3}, "matmul_curve"),
    ("stream_curve", {"int8": [[1 << 30, 2e10], [16 << 20, 4e10]]}, "increasing"),
    ("stream_curve", {"int8": [[16 << 20, 0.0]]}, "positive"),
    ("stream_curve", [1, 2], "stream_curve"),
    ("matmul_curve_bytes", -1.0, "matmul_curve_bytes"),
    ("pass_overhead_s", {"train": 0.1}, "prefill/decode"),
    ("layer_overhead_s", {"decode": -1e-3}, "layer_overhead_s"),
    ("score_elem_s", [1, 2], "score_elem_s"),
    ("kv_elem_s", {"decode": "x"}, "kv_elem_s"),
    ("kv_format_elem_s", {"int8": 1e-11}, "KV format"),
    ("kv_format_elem_s", {"bf16": -1e-11}, "kv_format_elem_s"),
    ("act_elem_s", {"prefill": -1e-9}, "act_elem_s"),
    ("prefill_score_curve", [[4, 1e-9], [1, 2e-9]], "increasing"),
    ("prefill_score_curve", [[1, -1e-9]], "prefill_score_curve"),
    ("prefill_score_curve", {"x": 1}, "prefill_score_curve"),
    ("logit_elem_s", "slow", "logit_elem_s"),
])
def test_malformed_measured_fields(field, value, msg):
    with pytest.raises(MeshlmError, match=msg):
        chip_from_dict({**HOST, field: value})
