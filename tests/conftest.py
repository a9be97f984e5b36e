"""8 simulated CPU devices for every test: set before JAX initialises, then initialise it here, so
that no in-process CLI call (`--devices N`) can change the device count for later tests."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a calibration left in ~/.cache/meshlm by `meshlm calibrate` must not change what tests plan
os.environ["MESHLM_HOME"] = tempfile.mkdtemp(prefix="meshlm-test-home-")

import jax  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
