"""`meshlm calibrate`: the spec it writes is one the planner loads, with the collective model's
algebra right (t = D/link_bw * (k-1)/k + hop_latency * (k-1) on a switch of k devices)."""

import json

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
