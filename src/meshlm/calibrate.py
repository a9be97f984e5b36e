"""Measure the local devices and write a chip spec the planner accepts (`meshlm calibrate`).

What is measured, per device, with every device of the mesh busy at once (on a CPU host the
simulated devices share the cores, so a per-device number measured alone would overstate them):

- matmul FLOP/s per dtype: f32, bf16, and the int8 weight path (blocked dequantization + f32 dot);
- memory bandwidth: a matrix-vector product over a weight far larger than the caches (the access
  pattern of a decode step);
- collectives: all-gather and all-reduce over all devices at several sizes; a least-squares line
  t = latency + bytes / bandwidth gives the link bandwidth and the per-collective latency.

Each number is the median of several timed runs after a warm-up (compile excluded).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from meshlm import quant


@dataclass
class Calibration:
    platform: str
    device_kind: str
    n_devices: int
    matmul_flops: dict[str, float] = field(default_factory=dict)  # per device, by dtype
    mem_bw: float = 0.0  # bytes/s per device
    collective_bw: float = 0.0  # bytes/s per device (all-gather output bytes per second)
    collective_latency_s: float = 0.0
    samples: dict[str, list] = field(default_factory=dict)


def _time(fn, *args, repeats: int = 7) -> float:
    """Median wall time of fn(*args) after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _mesh(devices):
    return jax.sharding.Mesh(np.array(devices), ("d",))


def _per_device(mesh, body, *arrays):
    """jit(shard_map(body)) with every input split over the single mesh axis 'd' (first dim)."""
    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(P("d") for _ in arrays), out_specs=P("d"),
                      check_vma=False)
    return jax.jit(f)


def _put(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("d")))


def measure_matmul(mesh, n: int, dtype: str, size: int) -> float:
    """FLOP/s per device of a size^3 matmul run on every device at once."""
    key = jax.random.key(0)
    if dtype == "int8":
        q = quant.quantize(np.asarray(jax.random.normal(key, (n, size, size), jnp.float32)), axis=-1)
        x = _put(mesh, jnp.ones((n * size, size), jnp.float32))
        qv = _put(mesh, jnp.asarray(q["q"]))  # [n, size, size] int8: one block per device
        qs = jax.device_put(jnp.asarray(q["s"]), NamedSharding(mesh, P()))

        def body(x, qv):
            return quant.dot_rows(x, qv[0], jnp.float32) * qs

        f = _per_device(mesh, body, x, qv)
        t = _time(f, x, qv)
    else:
        dt = jnp.dtype(dtype)
        a = _put(mesh, jnp.ones((n * size, size), dt))
        b = _put(mesh, jnp.ones((n * size, size), dt))
        f = _per_device(mesh, lambda a, b: a @ b, a, b)
        t = _time(f, a, b)
    return 2 * size**3 / t


def measure_mem_bw(mesh, n: int, mib_per_device: int) -> float:
    """Bytes/s per device streaming an f32 weight through a matrix-vector product."""
    cols = 4096
    rows = mib_per_device * 2**20 // (4 * cols)
    w = _put(mesh, jnp.ones((n * rows, cols), jnp.float32))
    v = _put(mesh, jnp.ones((n, rows), jnp.float32))
    f = _per_device(mesh, lambda w, v: v @ w, w, v)
    return rows * cols * 4 / _time(f, w, v)


def measure_collectives(mesh, n: int, sizes_bytes: list[int]) -> tuple[float, float, list]:
    """(bandwidth bytes/s, latency s, samples) of all-gather over all devices: t = lat + bytes/bw.

    `bytes` is the all-gather's per-device output buffer, the D of the paper's App. A.1."""
    samples = []
    for nbytes in sizes_bytes:
        per = max(nbytes // (4 * n), 1)
        x = _put(mesh, jnp.ones((n * per,), jnp.float32))
        f = _per_device(mesh, lambda x: jax.lax.all_gather(x, "d", tiled=True)[None], x)
        samples.append((per * n * 4, _time(f, x)))
    b = np.array([s[0] for s in samples], float)
    t = np.array([s[1] for s in samples], float)
    slope, icpt = np.polyfit(b, t, 1)
    bw = 1.0 / slope if slope > 0 else float("inf")
    return bw, max(float(icpt), 0.0), samples


def calibrate(devices=None, quick: bool = False, log=print) -> Calibration:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    mesh = _mesh(devices)
    d0 = devices[0]
    cal = Calibration(platform=d0.platform, device_kind=d0.device_kind, n_devices=n)
    on_cpu = d0.platform == "cpu"
    # large enough that the rate is what a long prefill sustains (512^3 under-reads it by ~30% on CPU)
    size = (256 if quick else 1536) if on_cpu else 4096
    for dtype in ("float32", "bfloat16", "int8"):
        log(f"matmul {dtype} {size}^3 on {n} device(s) ...")
        cal.matmul_flops[{"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)] = measure_matmul(mesh, n, dtype, size)
    mib = (32 if quick else 128) // (n if on_cpu else 1) if on_cpu else 1024
    log(f"memory bandwidth: matrix-vector over {mib} MiB per device ...")
    cal.mem_bw = measure_mem_bw(mesh, n, max(mib, 4))
    if n > 1:
        sizes = [2**k for k in (range(12, 22, 3) if quick else range(12, 25, 2))]
        log(f"all-gather over {n} devices, {len(sizes)} sizes ...")
        cal.collective_bw, cal.collective_latency_s, cal.samples["all_gather"] = measure_collectives(mesh, n, sizes)
    return cal


def host_memory_bytes() -> float:
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def to_chip_dict(cal: Calibration, compute_dtype: str) -> dict:
    """A ChipSpec (meshlm.hardware) whose numbers are all measured: efficiencies are 1 because
    the measured rates are already what this machine sustains. peak_flops is the compute dtype's
    rate; the other weight formats' rates go to weight_flops (the CPU int8 path has its own).

    The collective model is t = D/link_bw * (k-1)/k + hop_latency * (k-1) on a switch of k
    devices (meshlm.costmodel); the fitted line t = lat + D/bw gives both."""
    k = cal.n_devices
    on_cpu = cal.platform == "cpu"
    mem = host_memory_bytes() / k if on_cpu else float(_device_memory())
    spec = {
        "name": f"local-{cal.platform}-{k}",
        "peak_flops": cal.matmul_flops[compute_dtype],
        "hbm_bytes": mem,
        "hbm_bw": cal.mem_bw,
        "link_bw": (cal.collective_bw * (k - 1) / k) if k > 1 else cal.mem_bw,
        "topology": "switch",
        "switch_domain": k,
        "flops_efficiency": 1.0,
        "hbm_efficiency": 1.0,
        "hop_latency_s": cal.collective_latency_s / (k - 1) if k > 1 else 0.0,
        "vendor_peaks": [],
        "act_bytes": 4 if on_cpu else 2,  # the engine computes (and caches K/V) in f32 on CPU
        "weight_flops": [[d, v] for d, v in cal.matmul_flops.items() if d != compute_dtype],
        "source": f"meshlm calibrate: {k} x {cal.device_kind} ({cal.platform}), compute dtype {compute_dtype}, "
                  f"matmul FLOP/s per dtype {({d: round(v / 1e9, 2) for d, v in cal.matmul_flops.items()})} G",
    }
    return spec


def _device_memory() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 0)) or 16 * 2**30
