"""Which chip spec `deploy` prices on a CPU host: a calibration only for the device count it measured."""

import json

from meshlm.deploy import local_chip
from meshlm.hardware import CHIPS


def test_calibration_is_used_only_for_its_device_count(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHLM_HOME", str(tmp_path))
    assert local_chip(8).name == "cpu-generic/8"  # nothing calibrated
    spec = CHIPS["h100-sxm"].to_dict() | {"name": "local-cpu-8", "topology": "switch", "switch_domain": 8}
    (tmp_path / "local.json").write_text(json.dumps(spec))
    assert local_chip(8).name == "local-cpu-8"
    assert local_chip(1).name == "cpu-generic/1"  # measured on 8 simulated devices: not for 1
