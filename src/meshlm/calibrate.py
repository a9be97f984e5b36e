"""Measure the local devices and write a chip spec the planner accepts (`meshlm calibrate`).

What is measured, per device, with every device of the mesh busy at once (on a CPU host the
simulated devices share the cores, so a per-device number measured alone would overstate them):

- matmul FLOP/s per dtype: f32, bf16, and the int8 weight path (blocked dequantization + f32 dot),
  the median of passes taken in rounds at several points of the calibration;
- memory bandwidth: a matrix-vector product over a weight far larger than the caches (the access
  pattern of a decode step), the median of passes taken in rounds at several points of the
  calibration (`Rounds`, as the peak matmuls);
- collectives: all-gather and all-reduce over all devices at several sizes; a least-squares line
  t = latency + bytes / bandwidth gives the link bandwidth and the per-collective latency;
- the matmul curve: achieved FLOP/s against M, the rows of the activation, for the engine's weight
  formats (through `quant.dot_rows`, so whatever kernel the engine uses is what is timed), over a
  chain of E x F / F x E matrices larger than the last-level cache;
- the stream curve (CPU): one row's weight streaming rate against the working set, chains of 16
  MiB up to past the last-level cache read again and again (a model whose weights fit the cache
  streams them faster than the matmul curve's chain did; the cost model reads the curve at each
  pass's weights and KV cache);
- attention as the engine runs it (`measure_attention`, heads of d_head 64): decode over a cache
  larger than the last-level cache (what its K/V read costs beyond the memory bandwidth becomes
  seconds per cached element) and causal prefill over 1024-token prompts at batch 1, 2 and 4
  (what it costs beyond its FLOPs becomes seconds per score, against the batch);
- the engine's fixed costs (`engine_costs.calibrate_engine`): tiny models (d_model 64) of 2 and 8 layers, two
  vocabularies, short and long prompts, run through the real engine (prefill, decode steps); what
  the cost model (with the measured attention terms) does not explain of their times is fitted,
  per phase, as a per-pass intercept and a per-layer slope, plus seconds per sampled logit (B x V)
  and, for prefill, seconds per activation element a layer writes between its matmuls
  (costmodel.layer_act_elems: norms, RoPE, the attention's reshapes, residuals).
  (Fitting the attention terms on these tiny models too extrapolated badly: 8 ns per decode score
  where the engine's decode attention reads the cache at the memory bandwidth.)

Each number is the median of several timed runs after a warm-up (compile excluded). The points of
the matmul curve and the tiny models are timed in round-robin passes, so on a shared host they all
see the same mix of load and stay consistent with each other.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from meshlm import hugepages, quant
from meshlm.layouts import BYTES_PER_WEIGHT


@dataclass
class Calibration:
    platform: str
    device_kind: str
    n_devices: int
    matmul_flops: dict[str, float] = field(default_factory=dict)  # per device, by dtype
    mem_bw: float = 0.0  # bytes/s per device
    collective_bw: float = 0.0  # bytes/s per device (all-gather output bytes per second)
    collective_latency_s: float = 0.0
    matmul_curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # format -> [(M, FLOP/s)]
    matmul_curve_bytes: float = 0.0  # weight bytes per device of the curve's streamed chain
    stream_curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # format -> [(bytes, bytes/s)]
    attention: dict = field(default_factory=dict)  # measure_attention: seconds and shapes of each case
    samples: dict[str, list] = field(default_factory=dict)


def _time(fn, *args, repeats: int = 7) -> float:
    """Median wall time of fn(*args) after one warm-up call (which also compiles)."""
    r = Rounds(fn, args, 1.0)
    r.sample(repeats)
    return 1.0 / r.rate()


def _interleaved(calls: list, rounds: int) -> list[float]:
    """Median wall time of each call (a function that blocks until its work is done), after one
    warm-up each, timed in `rounds` round-robin passes over all of them: on a shared host every
    call sees the same mix of load, so a curve's points stay consistent when the load moves."""
    for c in calls:
        c()
    ts: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, c in enumerate(calls):
            t0 = time.perf_counter()
            c()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _mesh(devices):
    return jax.sharding.Mesh(np.array(devices), ("d",))


def _per_device(mesh, body, *arrays):
    """jit(shard_map(body)) with every input split over the single mesh axis 'd' (first dim)."""
    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(P("d") for _ in arrays), out_specs=P("d"),
                      check_vma=False)
    return jax.jit(f)


def _put(mesh, x):
    # on the pages the engine's weights get (hugepages): the rates it can reach
    x = jax.device_put(x, NamedSharding(mesh, P("d")))
    hugepages.advise(x)
    return x


class Rounds:
    """A rate (units per second of fn(*args)) measured in rounds of passes taken at several points
    of a calibration (`sample`), the median of all of them: on this VM one burst of 21 bandwidth
    passes read 54.8 and 65.3 GB/s where bursts seconds around it read 36-43 (a calibration that
    caught it priced every decode step ~30% too fast), and one burst of the f32 peak read 424
    GFLOP/s where the day's others read 332-384."""

    def __init__(self, fn, args: tuple, units: float):
        self.fn, self.args, self.units = fn, args, units
        jax.block_until_ready(fn(*args))  # compiles
        self.times: list[float] = []

    def sample(self, passes: int) -> None:
        for _ in range(passes):
            t0 = time.perf_counter()
            jax.block_until_ready(self.fn(*self.args))
            self.times.append(time.perf_counter() - t0)

    def rate(self) -> float:
        return self.units / statistics.median(self.times)

    def round_rates(self, passes: int) -> list[float]:
        return [self.units / statistics.median(self.times[i:i + passes]) for i in range(0, len(self.times), passes)]


def matmul_rounds(mesh, n: int, dtype: str, size: int) -> Rounds:
    """FLOP/s per device of a size^3 matmul ("f32", "bf16" or "int8" weights) on every device at once."""
    key = jax.random.key(0)
    if dtype == "int8":
        q = quant.quantize(np.asarray(jax.random.normal(key, (n, size, size), jnp.float32)), axis=-1)
        x = _put(mesh, jnp.ones((n * size, size), jnp.float32))
        qv = _put(mesh, jnp.asarray(q["q"]))  # [n, size, size] int8: one block per device
        qs = jax.device_put(jnp.asarray(q["s"]), NamedSharding(mesh, P()))

        def body(x, qv):
            return quant.dot_rows(x, qv[0], jnp.float32) * qs

        return Rounds(_per_device(mesh, body, x, qv), (x, qv), 2 * size**3)
    dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    a = _put(mesh, jnp.ones((n * size, size), dt))
    b = _put(mesh, jnp.ones((n * size, size), dt))
    return Rounds(_per_device(mesh, lambda a, b: a @ b, a, b), (a, b), 2 * size**3)


def bandwidth_mib(n: int, on_cpu: bool, quick: bool = False) -> int:
    """MiB per device of the bandwidth pass: past the last-level cache (128 MiB shared by the simulated
    CPU devices of one host), 1 GiB on an accelerator."""
    return max(4, (32 if quick else 128) // n) if on_cpu else 1024


def bandwidth_rounds(mesh, n: int, mib_per_device: int) -> Rounds:
    """Bytes/s per device streaming an f32 weight through a matrix-vector product: the fastest
    streaming code the engine has, so MBU reads as a fraction of what is reachable. One CPU device
    with the kernels: the packed weight through kernels.packed_matmul (XLA's matvec streamed it at
    22-36 GB/s between runs, the kernel at 38-41); otherwise XLA's matvec."""
    cols = 4096
    rows = mib_per_device * 2**20 // (4 * cols)
    v = _put(mesh, jnp.ones((n, rows), jnp.float32))
    # random values: a weight of all ones streamed 20-25% faster on this VM than real data
    w = np.random.default_rng(0).standard_normal((n * rows, cols), np.float32)
    if quant.packs("f32", n):
        w = _put(mesh, jnp.asarray(quant.pack_panels(w)))
        return Rounds(_per_device(mesh, lambda w, v: quant.dot_rows(v, w, jnp.float32), w, v), (w, v), rows * cols * 4)
    w = _put(mesh, jnp.asarray(w))
    return Rounds(_per_device(mesh, lambda w, v: v @ w, w, v), (w, v), rows * cols * 4)


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


# the top point prices the largest prefills: past M = 4096 the activations outgrow the last-level
# cache; on Zen 5 (2026-12-08) XLA's f32 dot, which f32 then took there, read 333-346 GFLOP/s at
# M = 16384 against 410-416 at 4096, and a curve that ended at 4096 priced a 16 x 1024 prefill
# 25-32% fast
CURVE_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
CURVE_M_QUICK = (1, 8, 64, 512)
CURVE_E, CURVE_F = 1024, 4096
_DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def measure_matmul_curve(mesh, n: int, weights: str, compute: str, ms, min_bytes: int, shape=(CURVE_E, CURVE_F),
                         log=print) -> list[tuple[int, float]]:
    """[(M, FLOP/s per device)]: x [M, E] through pairs W_in [E, F], W_out [F, E] (an MLP chain
    without the activation), weights stored as `weights` (f32, bf16 or int8), multiplied by
    `quant.dot_rows` in the compute dtype, every device at once. The chain holds min_bytes of
    weights per device (more than the last-level cache, so small M pays the weight streaming as a
    decode step does); from M = 256 up one pair suffices (compute-bound: the weight is reused by
    every row) and keeps the calibration short."""
    E, F = shape
    dt = jnp.dtype(_DTYPES.get(compute, compute))
    full = max(1, math.ceil(min_bytes / (2 * E * F * BYTES_PER_WEIGHT[weights])))
    mats = _chain(mesh, n, weights, E, F, 2 * full)
    rng = np.random.default_rng(1)
    calls, work = [], []
    for m in ms:
        # at least ~1024 rows x one pair of work per call: a single M = 256 pair (~15 ms) swung
        # from 178 to 283 GFLOP/s between neighbouring points on the shared host
        k = full if m < 256 else max(1, min(full, 1024 // m))
        ws = [w for w, _ in mats[:2 * k]]
        scales = [s for _, s in mats[:2 * k]]

        def body(x, *ws, scales=scales):
            for w, s in zip(ws, scales):
                x = quant.dot_rows(x, w, dt)
                if s is not None:
                    x = x * s.astype(dt)  # per output column, as the engine applies it
            return x

        x = _put(mesh, jnp.asarray(rng.standard_normal((n * m, E), np.float32), dtype=dt))
        f = _per_device(mesh, body, x, *ws)
        calls.append(lambda f=f, x=x, ws=ws: jax.block_until_ready(f(x, *ws)))
        work.append(4.0 * m * E * F * k)
    # the streamed (M < 256), the compute-bound and the past-the-cache (M > 4096) points are
    # interleaved separately: a large-M call between two streamed ones slowed them by a third (its
    # big buffers, its page faults), an M = 16384 call among M = 256-512 ones slowed those by 25-30%
    times = {}
    for band in (lambda m: m < 256, lambda m: 256 <= m <= 4096, lambda m: m > 4096):
        idx = [i for i, m in enumerate(ms) if band(m)]
        times.update(zip(idx, _interleaved([calls[i] for i in idx], rounds=7)))
    out = [(m, work[i] / times[i]) for i, m in enumerate(ms)]
    log(f"  {weights}: " + ", ".join(f"M={m} {r / 1e9:.0f}" for m, r in out) + " GFLOP/s")
    return out


def _chain(mesh, n: int, weights: str, E: int, F: int, count: int) -> list:
    """count weights [E, F], [F, E], [E, F], ... per device in the format, as the engine stores
    them: [(weight, int8 scales or None)], random values of unit gain."""
    rng = np.random.default_rng(0)

    def stored(rows, cols):
        w = rng.standard_normal((n, rows, cols), np.float32) / np.sqrt(rows)
        packed = quant.packs(weights, n) and quant.packable(w[0])  # as the engine stores them on one device
        if weights != "int8":
            if packed:
                return _put(mesh, jnp.asarray(quant.pack_panels(w[0].astype(np.float32)))), None
            return _put(mesh, jnp.asarray(w.reshape(n * rows, cols), _DTYPES.get(weights, weights))), None
        q = quant.quantize(w, axis=-1)
        if packed:
            return _put(mesh, jnp.asarray(quant.pack_panels(q["q"][0]))), jnp.asarray(q["s"])
        return _put(mesh, jnp.asarray(q["q"].reshape(n * rows, cols))), jnp.asarray(q["s"])

    return [stored(E, F) if i % 2 == 0 else stored(F, E) for i in range(count)]


# The stream curve: one row through chains of STREAM_E x STREAM_F weight pairs (16 MiB of f32, 4 MiB of
# int8 a pair), from STREAM_MIN_BYTES of weights on the host up to twice the last-level cache (at least
# STREAM_MAX_BYTES), each chain read again and again until a call has streamed STREAM_CALL_BYTES. On
# the Intel host (480 MiB L3) the packed f32 kernel read 51-54 GB/s over 32-64 MiB, 35 over 128 and 28
# over 256-512 MiB (int8: 42, 23, 22), and SmolLM2's int8 decode (134 MB) ran 22-35% faster than the
# matmul curve's 256 MiB chain priced it.
STREAM_E, STREAM_F = 1024, 2048
STREAM_MIN_BYTES, STREAM_MAX_BYTES, STREAM_CALL_BYTES = 16 << 20, 256 << 20, 256 << 20


def llc_bytes() -> int:
    """The size of the largest CPU cache in sysfs (the last-level cache), 0 where none is listed."""
    from pathlib import Path

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            v = f.read_text().strip()
            best = max(best, int(v[:-1]) * units[v[-1]] if v[-1] in units else int(v))
        except (OSError, ValueError):
            continue
    return best


def stream_sizes(n: int, quick: bool = False, llc: int | None = None) -> list[int]:
    """Bytes per device of the stream curve's chains: the host's powers of two from STREAM_MIN_BYTES
    to max(STREAM_MAX_BYTES, 2 x llc), shared by the n devices (quick: 1 and 4 MiB per device)."""
    if quick:
        return [1 << 20, 4 << 20]
    top = max(STREAM_MAX_BYTES, 2 * (llc_bytes() if llc is None else llc))
    sizes, s = [], STREAM_MIN_BYTES
    while s < 2 * top:
        sizes.append(s // n)
        s *= 2
    return sizes


def measure_stream_curve(mesh, n: int, weights: str, compute: str, sizes: list[int], shape=(STREAM_E, STREAM_F),
                         call_bytes: int = STREAM_CALL_BYTES, log=print) -> list[tuple[int, float]]:
    """[(weight bytes per device, bytes/s per device)]: one row of x through a chain of that many
    bytes of weights (pairs of `shape`, stored as the engine stores `weights`), read again and
    again in one call (a decode step reads the same weights step after step), every device at
    once. The chain of each size is a prefix of the largest; the sizes are timed round-robin."""
    E, F = shape
    pair = 2 * E * F * BYTES_PER_WEIGHT[weights]
    pairs = sorted({max(1, round(s / pair)) for s in sizes})  # whole pairs: two sizes may round alike
    mats = _chain(mesh, n, weights, E, F, 2 * max(pairs))
    dt = jnp.dtype(_DTYPES.get(compute, compute))
    x = _put(mesh, jnp.asarray(np.random.default_rng(1).standard_normal((n, E), np.float32), dtype=dt))
    calls, streamed = [], []
    for k in pairs:
        ws, scales = [w for w, _ in mats[:2 * k]], [s for _, s in mats[:2 * k]]
        reps = max(1, math.ceil(call_bytes / (k * pair)))

        def body(x, *ws, scales=scales, reps=reps):
            def chain(_, x):
                for w, s in zip(ws, scales):
                    x = quant.dot_rows(x, w, dt, s)
                return x * jax.lax.rsqrt(jnp.mean(x * x) + 1e-30)  # unit size over the repeats

            return jax.lax.fori_loop(0, reps, chain, x)

        f = _per_device(mesh, body, x, *ws)
        calls.append(lambda f=f, ws=ws: jax.block_until_ready(f(x, *ws)))
        streamed.append(reps * k * pair)
    times = _interleaved(calls, rounds=7)
    raw = [b / t for b, t in zip(streamed, times)]
    log(f"  {weights}: " + ", ".join(f"{k * pair / 2**20:.0f} MiB {r / 1e9:.1f}" for k, r in zip(pairs, raw)) + " GB/s")
    # A smaller chain is a prefix of a larger one and never streams slower; a point below a larger
    # one's rate is a slow stretch of the host (Zen 4, 2026-12-06: int8 over 16 MiB once read 19.0
    # GB/s between 38.5 at 32 MiB, where alone it read 51-61), so each takes the best rate at or past it.
    return [(k * pair, max(raw[i:])) for i, k in enumerate(pairs)]


# Attention as the engine runs it, on heads of a typical size (d_head 64, 3 query heads per KV
# head): decode over a cache larger than the last-level cache, prefill over long prompts.
ATTN_DECODE = (4, 4096, 4, 3, 64)  # B, S, K, G, D: 32 MiB of f32 K and V per layer
ATTN_PREFILL = (1, 1024, 3, 3, 64)  # B, L, K, G, D (timed at each batch below)
ATTN_DECODE_QUICK, ATTN_PREFILL_QUICK = (2, 1024, 2, 3, 64), (1, 256, 2, 3, 64)
# prefill is timed at several batches: per score it cost 2.83-2.96 ns at batch 1, 1.86-1.95 at 2 and
# 1.60-1.68 at 4 on the development host (int8 4 x 1024 prompts had been over-predicted by 22-34%)
ATTN_PREFILL_BATCHES, ATTN_PREFILL_BATCHES_QUICK = (1, 2, 4), (1, 2)


def measure_attention(mesh, n: int, quick: bool = False, min_bytes: int = 256 << 20, log=print) -> dict:
    """Seconds per layer of the engine's decode attention (`model.attend_one`: one query per row
    against a [B, S, K, D] cache at its last position, in each KV format) and prefill attention
    (`model.attend_causal` over B x L prompts, at each batch of ATTN_PREFILL_BATCHES), every device
    at once, with the shapes timed.
    Decode chains enough layers to stream min_bytes of cache per device, as a real step does;
    prefill chains 8 layers (2 quick), each query the last layer's output."""
    from meshlm.layouts import KV_FORMATS
    from meshlm.model import attend_causal, attend_one
    from meshlm.sharded import KV_DTYPES

    rng = np.random.default_rng(0)
    dshape, pshape = (ATTN_DECODE_QUICK, ATTN_PREFILL_QUICK) if quick else (ATTN_DECODE, ATTN_PREFILL)
    B, S, K, G, D = dshape
    layers = max(1, math.ceil((4 << 20 if quick else min_bytes) / (2 * B * S * K * D * 4)))
    q = _put(mesh, jnp.asarray(rng.standard_normal((n * B, K, G, D), np.float32)))
    pos = _put(mesh, jnp.full((n * B,), S - 1, jnp.int32))

    def decode(q, pos, *kv):
        o = q
        for i in range(layers):  # each layer's query depends on the last one's output
            o = attend_one(o, kv[2 * i], kv[2 * i + 1], pos) * 0.5 + q
        return o

    t_dec = {}
    for fmt in KV_FORMATS:  # the same elements in each cache format the engine offers
        caches = [_put(mesh, jnp.asarray(rng.standard_normal((n * B, S, K, D), np.float32)).astype(KV_DTYPES[fmt]))
                  for _ in range(2 * layers)]
        f = _per_device(mesh, decode, q, pos, *caches)
        t_dec[fmt] = _time(lambda: f(q, pos, *caches)) / layers
        del caches
    _, L, K, G, D = pshape
    chain = 2 if quick else 8

    def prefill(q, k, v, lengths):
        # layers back to back, as in a pass: one call alone took 31-33 ms per layer here, a chain
        # of 8 23-26, and the engine's 1 x 1024 prefills imply ~22 (1.36 s less ~0.7 s of matmuls)
        o = q
        for _ in range(chain):
            o = attend_causal(o, k, v, lengths) * 0.5 + q
        return o

    batches = []
    for B in (ATTN_PREFILL_BATCHES_QUICK if quick else ATTN_PREFILL_BATCHES):
        qp = _put(mesh, jnp.asarray(rng.standard_normal((n * B, L, K, G, D), np.float32)))
        kp, vp = (_put(mesh, jnp.asarray(rng.standard_normal((n * B, L, K, D), np.float32))) for _ in range(2))
        lengths = _put(mesh, jnp.full((n * B,), L, jnp.int32))
        g = _per_device(mesh, prefill, qp, kp, vp, lengths)
        batches.append((B, _time(lambda: g(qp, kp, vp, lengths)) / chain))
    log(f"  decode " + ", ".join(f"{t * 1e3:.3f} ms ({fmt})" for fmt, t in t_dec.items())
        + f" per layer (B, S, K, G, D = {dshape}), prefill per layer "
        + ", ".join(f"{t * 1e3:.2f} ms at B = {B}" for B, t in batches) + f" (L, K, G, D = {pshape[1:]})")
    return {"decode_s": t_dec["f32"], "decode_s_by_format": t_dec, "decode_shape": dshape,
            "prefill_shape": pshape, "prefill_batches": batches}


def attention_fields(attn: dict, mem_bw: float, flops: float, act_bytes: int) -> dict:
    """The cost model's attention terms from measure_attention: what the bandwidth read of K/V
    (decode) and the larger of the score FLOPs and the K/V read (prefill) do not explain goes to
    kv_elem_s (decode, per cached K/V element of an f32 cache), kv_format_elem_s (the same per
    cache format timed) and score_elem_s (prefill, per score of the cost model's full L x L count;
    at each batch timed: prefill_score_curve). Never negative."""
    B, S, K, G, D = attn["decode_shape"]
    elems = 2 * B * S * K * D
    kv_dec = max(0.0, attn["decode_s"] / elems - act_bytes / mem_bw)
    by_format = {fmt: max(0.0, t / elems - BYTES_PER_WEIGHT[fmt] / mem_bw)
                 for fmt, t in attn.get("decode_s_by_format", {}).items()}
    _, L, K, G, D = attn["prefill_shape"]

    def per_score(B: int, t: float) -> float:
        scores = B * L * L * K * G
        floor = max(4.0 * scores * D / flops, 2 * B * L * K * D * act_bytes / mem_bw)
        return max(0.0, (t - floor) / scores)

    curve = [[B, per_score(B, t)] for B, t in attn["prefill_batches"]]
    return {"score_elem_s": {"prefill": curve[0][1], "decode": 0.0}, "prefill_score_curve": curve,
            "kv_elem_s": {"prefill": 0.0, "decode": kv_dec}, **({"kv_format_elem_s": by_format} if by_format else {})}


ROUND_PASSES = 7  # passes per round of the peak matmuls and the bandwidth; rounds at 5 points of calibrate()


def calibrate(devices=None, quick: bool = False, log=print) -> Calibration:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    mesh = _mesh(devices)
    d0 = devices[0]
    cal = Calibration(platform=d0.platform, device_kind=d0.device_kind, n_devices=n)
    on_cpu = d0.platform == "cpu"
    # large enough that the rate is what a long prefill sustains (512^3 under-reads it by ~30% on CPU)
    size = (256 if quick else 1536) if on_cpu else 4096
    mib = bandwidth_mib(n, on_cpu, quick)
    log(f"matmul f32, bf16, int8 {size}^3 and memory bandwidth (matrix-vector over {mib} MiB) on {n} device(s), "
        f"rounds of {ROUND_PASSES} passes spread over the calibration ...")
    rounds = {dt: matmul_rounds(mesh, n, dt, size) for dt in ("f32", "bf16", "int8")}
    rounds["mem"] = bandwidth_rounds(mesh, n, mib)

    def sample_rounds():
        for r in rounds.values():
            r.sample(ROUND_PASSES)

    sample_rounds()
    if n > 1:
        sizes = [2**k for k in (range(12, 22, 3) if quick else range(12, 25, 2))]
        log(f"all-gather over {n} devices, {len(sizes)} sizes ...")
        cal.collective_bw, cal.collective_latency_s, cal.samples["all_gather"] = measure_collectives(mesh, n, sizes)
    compute = "f32" if on_cpu else "bf16"
    # 256 MiB: each call's fixed cost (dispatch, waking the threads, ~1 ms on CPU) is priced on its
    # own (pass_overhead_s); over a 64 MiB chain it halved the M = 1 rate (19 vs 29-34 GB/s).
    min_bytes = ((256 << 20) // n if on_cpu else 512 << 20) if not quick else 4 << 20
    shape = (256, 1024) if quick else (CURVE_E, CURVE_F)
    log(f"matmul curve: [M, {shape[0]}] x chained {shape[0]}x{shape[1]} weights, M in "
        f"{list(CURVE_M_QUICK if quick else CURVE_M)} ...")
    for w in (compute, "int8"):
        sample_rounds()
        cal.matmul_curve[w] = measure_matmul_curve(mesh, n, w, compute, CURVE_M_QUICK if quick else CURVE_M,
                                                   min_bytes, shape, log)
    cal.matmul_curve_bytes = min_bytes  # what its chains hold (whole pairs: min_bytes where it divides)
    if on_cpu:  # a CPU's last-level cache is large enough to hold a small model's weights
        llc = llc_bytes()
        sizes = stream_sizes(n, quick, llc)
        log(f"stream curve: one row through {', '.join(f'{b / 2**20:g}' for b in sizes)} MiB of weights per "
            f"device, read again and again (last-level cache: {llc / 2**20:g} MiB) ...")
        for w in (compute, "int8"):
            sample_rounds()
            cal.stream_curve[w] = measure_stream_curve(
                mesh, n, w, compute, sizes, (256, 1024) if quick else (STREAM_E, STREAM_F),
                (4 << 20) if quick else STREAM_CALL_BYTES, log)
    sample_rounds()
    log("attention as the engine runs it (decode over a cache past the last-level cache, causal prefill) ...")
    cal.attention = measure_attention(mesh, n, quick, min_bytes, log)
    sample_rounds()
    bw = rounds.pop("mem")
    cal.mem_bw = bw.rate()
    cal.matmul_flops = {dt: r.rate() for dt, r in rounds.items()}
    cal.samples["mem_bw_pass_s"], cal.samples["f32_peak_pass_s"] = bw.times, rounds["f32"].times
    bw_rounds, f32_rounds = (", ".join(f"{x / 1e9:.{d}f}" for x in r.round_rates(ROUND_PASSES))
                             for r, d in ((bw, 1), (rounds["f32"], 0)))
    log(f"memory bandwidth {cal.mem_bw / 1e9:.1f} GB/s, f32 peak {cal.matmul_flops['f32'] / 1e9:.0f} GFLOP/s per "
        f"device: medians of {len(bw.times)} passes (rounds: {bw_rounds} GB/s; {f32_rounds} GFLOP/s)")
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
        "matmul_curve": {w: [[m, r] for m, r in pts] for w, pts in cal.matmul_curve.items()},
        **({"matmul_curve_bytes": cal.matmul_curve_bytes,
            "stream_curve": {w: [[b, r] for b, r in pts] for w, pts in cal.stream_curve.items()}}
           if cal.stream_curve else {}),
        **(attention_fields(cal.attention, cal.mem_bw, cal.matmul_flops[compute_dtype], 4 if on_cpu else 2)
           if cal.attention else {}),
        "source": f"meshlm calibrate: {k} x {cal.device_kind} ({cal.platform}), compute dtype {compute_dtype}, "
                  f"matmul FLOP/s per dtype {({d: round(v / 1e9, 2) for d, v in cal.matmul_flops.items()})} G, "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {_loadavg()}",
    }
    return spec


def _loadavg() -> str:
    """The 1-minute load average (other processes sharing the host distort every rate)."""
    import os

    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def _device_memory() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 0)) or 16 * 2**30
