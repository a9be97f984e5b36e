"""Build the (x, y, z) device mesh the layouts run on, from any device set: simulated CPU devices,
one GPU box, a TPU slice, or several processes (jax.devices() is global after
jax.distributed.initialize)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from meshlm.errors import MeshlmError
from meshlm.layouts import AXES, MeshShape


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    """An (x, y, z) Mesh of shape.n devices (default: the first shape.n of jax.devices()).

    Uses jax's topology-aware ordering when it applies (TPU/GPU), plain order otherwise. Axis
    types stay the default (not Explicit): shard_map bodies name every collective themselves."""
    devs = list(jax.devices() if devices is None else devices)
    if len(devs) < shape.n:
        raise MeshlmError(f"mesh {shape} needs {shape.n} devices, only {len(devs)} available "
                          f"(on a CPU-only host use --devices N to simulate N devices)")
    devs = devs[: shape.n]
    arr = None
    if devs[0].platform != "cpu" and len(devs) == len(jax.devices()):
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape.as_tuple(), devices=devs)
        except Exception:  # noqa: BLE001 - any topology the helper does not know: plain order
            arr = None
    if arr is None:
        arr = np.array(devs, dtype=object).reshape(shape.as_tuple())
    return Mesh(arr, AXES)


def simulate_cpu_devices(n: int) -> None:
    """Ask XLA for n CPU devices. Must run before JAX initialises its backends."""
    import os

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # noqa: BLE001 - older/newer jax without the option: the flag above does it
        pass
