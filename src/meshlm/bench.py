"""Measured next to predicted (`meshlm bench`): for each configuration (layout pair, weight format,
batch, input length) run the engine and time the prefill (time to first token) and every decode
step, and put the cost model's prediction for exactly the shapes that ran beside it.

    rows = run(load_host("default"), batches=[1, 4], input_lens=[128], gen_len=32)
    print(table(rows)); plot(rows, "decode.png")

Timing rules: every configuration is run once first (compiles the prefill bucket and the decode
step; reported separately as `first_run_s`/`compile_s`), then timed. TTFT is the median over
`repeats` prefills of the whole batch (the first token ids are on the host when the clock stops);
short prefills take more, up to TTFT_MAX_REPEATS within about TTFT_BUDGET_S (as `timeit`'s
autorange does): the first timed prefills of a fresh deployment were at times 30-60% slower than
the rest (int8 1 x 128: 136, 170, then 104-110 ms), and 3 of them made that the median.
Decode is timed in each of the `repeats` runs, per dispatch of the engine's k steps (ids on the
host; seconds per token = the dispatch's time / k), and reported as p50/p90/p99 over all of them.
Python's garbage collector runs before the timed runs and is paused during them (as `timeit`
does): a deployment is freed only by a collection (it holds reference cycles), and collecting the
previous configuration's took ~160 ms inside whichever prefill or step triggered it.
With `visits` V > 1 the whole list of configurations is measured V times over, each visit a fresh
deployment, and a configuration's TTFT and decode p50 are the medians of its visits' (p90/p99 over
all its steps): a slow stretch of a shared host (minutes, on this VM) then lands in one visit of a
configuration, not in all its samples (one 16 x 16 configuration ran 58-70% slow in one run of the
earlier single-visit grid while the rest of it was within 30%). MFU counts the
unpadded model FLOPs (2 N per token, the paper's definition); MBU counts the bytes one decode
step must read per device (stored weights, times the weight-gather group, plus the whole KV cache
the step attends over) against the chip's memory bandwidth.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from meshlm.errors import MeshlmError
from meshlm.sampling import SamplingParams

TTFT_BUDGET_S = 1.0  # short prefills are timed more often, up to about this long in all
TTFT_MAX_REPEATS = 9


@dataclass(frozen=True)
class Config:
    pair: str  # "planner" or "PREFILL:DECODE" layouts (e.g. "wg-xyz/heads:ws2d/batch")
    weights: str | None  # None: the platform default (f32 on CPU), or "int8"
    batch: int
    input_len: int
    gen_len: int
    kv_cache: str | None = None  # the KV cache's format (layouts.KV_FORMATS); None: the activation dtype


def load_host(model: str = "default", progress: bool = False):
    """The checkpoint with host (numpy) leaves, reused by every configuration's deployment."""
    from meshlm.checkpoints import load_model

    return load_model(model, placer_for=lambda cfg: (lambda path, a: a), progress=progress)


def prompts(batch: int, input_len: int, vocab: int) -> list[list[int]]:
    """Deterministic, distinct prompts of exactly input_len ids (no special tokens below 100)."""
    span = max(vocab - 200, 1)
    return [[100 + (7 * i + 131 * b + 17) % span for i in range(input_len)] for b in range(batch)]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, float), q)) if xs else 0.0


def deploy_config(host, c: Config, n_devices: int | None = None, mesh=None, steps_per_dispatch: int | None = None):
    from meshlm.deploy import deploy
    from meshlm.engine import DEFAULT_STEPS_PER_DISPATCH

    pre, dec = (None, None) if c.pair == "planner" else _split_pair(c.pair)
    return deploy(host.source, n_devices=n_devices, mesh=mesh, prefill=pre, decode=dec, quantize=c.weights,
                  slots=c.batch, max_len=c.input_len + c.gen_len, batch=c.batch, input_len=c.input_len,
                  gen_len=c.gen_len, progress=False, host=host,
                  steps_per_dispatch=steps_per_dispatch or DEFAULT_STEPS_PER_DISPATCH, kv_cache=c.kv_cache)


def _split_pair(pair: str) -> tuple[str, str]:
    parts = pair.split(":")
    if len(parts) != 2 or not all(parts):
        raise MeshlmError(f"layout pair {pair!r}: expected 'planner' or PREFILL:DECODE, e.g. wg-xyz/heads:ws2d/batch")
    return parts[0], parts[1]


def run_once(eng, ps: list[list[int]], gen_len: int) -> tuple[float, list[float]]:
    """(prefill seconds, [seconds per token of each decode dispatch]) of one whole batch: greedy,
    EOS ignored, gen_len steps rounded up to whole dispatches of the engine's k steps."""
    sp = SamplingParams(max_tokens=gen_len + 1, ignore_eos=True)
    t = time.perf_counter()
    pre = eng.prefill(ps, [sp] * len(ps))  # first ids come back to the host: the prefill is done
    ttft = time.perf_counter() - t
    for i in range(len(ps)):
        eng.insert(pre, i, i, sp)
    steps = []
    for _ in range(-(-gen_len // eng.k)):
        t = time.perf_counter()
        eng.generate()  # returns host ids: the k steps are done (and the next k launched)
        steps.append((time.perf_counter() - t) / eng.k)
    eng.sync()  # the dispatch launched ahead must not run into the next measurement
    return ttft, steps


def measure(d, c: Config, repeats: int = 3, prompt_ids: list[list[int]] | None = None) -> dict:
    """Time one deployment on config c (see the module docstring); prompts of c.input_len
    deterministic ids unless `prompt_ids` (c.batch lists of c.input_len ids) are given."""
    eng = d.engine
    if eng.slots < c.batch:
        raise MeshlmError(f"engine has {eng.slots} slots, config needs {c.batch}")
    ps = prompt_ids or prompts(c.batch, c.input_len, d.model.cfg.vocab)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t = time.perf_counter()
        first_ttft, first_steps = run_once(eng, ps, min(2, c.gen_len))
        first = time.perf_counter() - t
        ttfts, steps = [], []
        for _ in range(repeats):  # decode timed in each of them: one slow moment of a shared host
            ttft, st = run_once(eng, ps, c.gen_len)  # moves a p50 over one run's window alone
            ttfts.append(ttft)
            steps += st
        n = max(repeats, min(TTFT_MAX_REPEATS, math.ceil(TTFT_BUDGET_S / max(ttfts[0], 1e-6))))
        for _ in range(n - repeats):
            ttfts.append(run_once(eng, ps, 0)[0])
    finally:
        if was_enabled:
            gc.enable()
    ttft = statistics.median(ttfts)
    p50 = percentile(steps, 50)
    return {"ttft_s": ttft, **decode_stats(c.batch, steps, p50), "first_run_s": first,
            "compile_s": max(0.0, first_ttft - ttft) + max(0.0, first_steps[0] - p50) * eng.k,
            "ttft_repeats": len(ttfts), "steps_per_dispatch": eng.k, "prefill_shape": list(eng.stats.prefill_shape),
            # what meshlm.hugepages did to the weights (None: a backend that places none itself)
            "weight_pages": getattr(getattr(eng.backend, "sm", None), "hugepages", None)}


def decode_stats(batch: int, steps: list[float], p50: float) -> dict:
    """The decode numbers of a configuration: its timed steps (seconds per token), its p50 (given:
    over several visits, the median visit's), p90/p99 (never below it) and mean over every step."""
    return {"decode_p50_s": p50, "decode_p90_s": max(p50, percentile(steps, 90)),
            "decode_p99_s": max(p50, percentile(steps, 99)), "decode_mean_s": statistics.fmean(steps),
            "tokens_per_s": batch / p50, "decode_steps_s": steps}


def merge_visits(c: Config, ms: list[dict]) -> dict:
    """One configuration's measurements over its visits: the median visit's TTFT and decode p50,
    p90/p99/mean over every step, compile time and shapes from the first visit, each visit's
    TTFT and p50 kept."""
    if len(ms) == 1:
        return ms[0]
    steps = [s for m in ms for s in m["decode_steps_s"]]
    return {**ms[0], "ttft_s": statistics.median(m["ttft_s"] for m in ms),
            **decode_stats(c.batch, steps, statistics.median(m["decode_p50_s"] for m in ms)),
            "ttft_repeats": sum(m["ttft_repeats"] for m in ms), "visits": len(ms),
            "ttft_visits_s": [m["ttft_s"] for m in ms], "decode_p50_visits_s": [m["decode_p50_s"] for m in ms]}


def predict(d, c: Config) -> dict:
    """The cost model for exactly what ran (meshlm.deploy.predict_engine)."""
    from meshlm.deploy import predict_engine

    return predict_engine(d.model.cfg, d.chip, d.layouts, d.engine)


def decode_bytes_per_device(d) -> float:
    """Bytes one decode step reads on one device: the weights it multiplies (the stored shard
    times the weight-gather group) and the whole KV cache it attends over."""
    import jax

    from meshlm.costmodel import weight_read_bytes

    n = d.layouts["decode"].mesh.n
    kv = sum(a.nbytes for a in jax.tree.leaves(d.engine.cache)) / n
    return weight_read_bytes(d.model.cfg, d.layouts["decode"]) + kv


def utilization(d, c: Config, m: dict) -> dict:
    """MFU of prefill and decode, MBU of decode, against the deployment's chip spec."""
    cfg, chip = d.model.cfg, d.chip
    n = d.layouts["decode"].mesh.n
    flops_tok = 2.0 * cfg.n_params_mfu
    return {"prefill_mfu": flops_tok * c.batch * c.input_len / (m["ttft_s"] * n * chip.peak_flops),
            "decode_mfu": flops_tok * c.batch / (m["decode_p50_s"] * n * chip.peak_flops),
            "decode_mbu": decode_bytes_per_device(d) / (m["decode_p50_s"] * chip.hbm_bw)}


def on_prompts(host, ids: list[list[int]], weights: str | None, gen_len: int, repeats: int = 3) -> dict:
    """meshlm on exactly these prompt ids (for comparisons with other engines): the planner's
    layouts, its greedy tokens (EOS ignored) and the timings of `measure`."""
    c = Config("planner", weights, len(ids), len(ids[0]), gen_len)
    d = deploy_config(host, c)
    tokens = d.engine.generate_ids(ids, SamplingParams(max_tokens=gen_len, ignore_eos=True))
    return {"weights": d.layouts["decode"].weights, "tokens": tokens, **measure(d, c, repeats, prompt_ids=ids)}


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "cpu family", "model", "flags",
    ...); empty where there is none."""
    info: dict[str, str] = {}
    if os.path.exists("/proc/cpuinfo"):
        for ln in open("/proc/cpuinfo"):
            key, _, value = ln.partition(":")
            if not key.strip():  # the blank line after the first processor
                break
            info.setdefault(key.strip(), value.strip())
    return info


def machine() -> dict:
    """Where and when a measurement ran (date, CPU, cores, devices, 1-minute load average)."""
    import platform

    import jax

    from meshlm import kernels

    info = cpuinfo()
    dev = jax.devices()[0]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpu": info.get("model name", ""), "nproc": os.cpu_count(),
           "device": f"{len(jax.devices())} x {dev.device_kind} ({dev.platform})", "loadavg_1m": os.getloadavg()[0]}
    if "cpu family" in info:
        out["cpu_id"] = f"family {info['cpu family']} model {info.get('model', '?')}"
    if dev.platform == "cpu":
        out["kernel_isa"] = kernels.isa()  # which code path of the CPU kernels ran (None: the XLA paths)
    return out


def write_json(path: str, obj: dict, quiet: bool = False) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    if not quiet:
        print(f"wrote {path}")


def rel_err(measured: float, predicted: float) -> float:
    return (measured - predicted) / predicted if predicted > 0 else float("inf")


def configs(pairs: list[str], weights: list[str | None], batches: list[int], input_lens: list[int],
            gen_len: int, kv_caches: list[str | None] = (None,)) -> list[Config]:
    return [Config(p, w, b, L, gen_len, kv) for p in pairs for w in weights for kv in kv_caches for b in batches
            for L in input_lens]


def cache_format(d) -> str:
    """The KV cache's element format as the engine holds it ("f32", "bf16")."""
    import jax

    from meshlm.sharded import KV_DTYPES

    dt = jax.tree.leaves(d.engine.cache)[0].dtype
    return next((f for f, t in KV_DTYPES.items() if t == dt), str(dt))


HOST_CHECK_PASSES = 7  # calibrate's bandwidth pass, this many times after each configuration


class HostCheck:
    """The calibration's memory-bandwidth pass (`calibrate.bandwidth_rounds`) on the bench's devices,
    sampled after each configuration: whether the host still streams at the speed the chip spec
    was calibrated at (this VM's bandwidth moved from 27 to 68 GB/s within one calibration, and a
    calibration taken in a slow stretch over-predicted the grid after it by ~20%)."""

    def __init__(self, n_devices: int | None):
        import jax

        from meshlm import calibrate

        devs = jax.devices()[:n_devices or len(jax.devices())]
        n = len(devs)
        mib = calibrate.bandwidth_mib(n, devs[0].platform == "cpu")
        self.rounds = calibrate.bandwidth_rounds(calibrate._mesh(devs), n, mib)

    def sample(self) -> float:
        """Bytes/s per device now: the median of HOST_CHECK_PASSES passes."""
        k = len(self.rounds.times)
        self.rounds.sample(HOST_CHECK_PASSES)
        return self.rounds.units / statistics.median(self.rounds.times[k:])


def run(host, cfgs: list[Config], n_devices: int | None = None, mesh=None, repeats: int = 3, log=None,
        on_row=None, steps_per_dispatch: int | None = None, host_check: bool = True, visits: int = 1,
        progress=None) -> list[dict]:
    """Deploy and measure every config, `visits` times over (see the module docstring); one row per
    config (measured, predicted, errors, layouts, the host's load average and, with host_check, its
    memory bandwidth after it: the median of the checks after its visits). log(row line) and
    on_row(rows so far) in the last visit (e.g. to save partial results); progress(line) after each
    configuration of the earlier visits."""
    check = HostCheck(n_devices) if host_check else None
    per: list[list[dict]] = [[] for _ in cfgs]
    bws: list[list[float]] = [[] for _ in cfgs]
    rows = []
    for v in range(visits):
        for i, c in enumerate(cfgs):
            d = deploy_config(host, c, n_devices, mesh, steps_per_dispatch)
            per[i].append(measure(d, c, repeats))
            if check:
                bws[i].append(check.sample())
            if v < visits - 1:
                if progress:
                    m = per[i][-1]
                    progress(f"visit {v + 1}/{visits}: {d.layouts['decode'].weights}/{cache_format(d)} B={c.batch} "
                             f"L={c.input_len}: "
                             f"TTFT {m['ttft_s'] * 1e3:.1f} ms, decode {m['decode_p50_s'] * 1e3:.1f} ms/step")
            else:
                rows.append(_row(d, c, merge_visits(c, per[i]), bws[i]))
                if log:
                    log(format_row(rows[-1]))
                if on_row:
                    on_row(rows)
            del d
            gc.collect()  # the deployment is freed here, not in the next one's measurement
    return rows


def _row(d, c: Config, m: dict, bws: list[float]) -> dict:
    """A configuration's row: what was measured beside the cost model's prediction for what ran."""
    p = predict(d, c)
    lay = d.layouts
    row = {"pair": c.pair, "prefill_layout": lay["prefill"].short, "decode_layout": lay["decode"].short,
           "mesh": str(lay["decode"].mesh), "weights": lay["decode"].weights, "kv_cache": cache_format(d),
           "batch": c.batch, "input_len": c.input_len, "gen_len": c.gen_len, "chip": d.chip.name,
           **m, **utilization(d, c, m),
           "predicted_ttft_s": p["ttft_s"], "predicted_decode_s": p["decode_s"],
           "ttft_rel_err": rel_err(m["ttft_s"], p["ttft_s"]),
           "decode_rel_err": rel_err(m["decode_p50_s"], p["decode_s"]),
           # the predicted terms (seconds; decode: per step) say which part of a miss is which
           "predicted_prefill_terms": p["prefill"].breakdown,
           "predicted_decode_terms": p["decode"].breakdown,
           "predicted_decode_curve": decode_curve(d.model.cfg, d.chip, lay["decode"], d.engine.max_len,
                                                  max(64, c.batch)),
           "loadavg_1m": os.getloadavg()[0], "chip_mem_bw": d.chip.mem_bw}
    if bws:
        row["host_mem_bw"] = statistics.median(bws)
        if len(bws) > 1:
            row["host_mem_bw_visits"] = bws
    return row


HEADER = (f"{'layouts (prefill:decode)':34s} {'w/kv':9s} {'B':>3s} {'L':>5s} | {'TTFT ms':>9s} {'pred':>9s} {'err':>6s} "
          f"| {'decode ms p50/p90/p99':>22s} {'pred':>7s} {'err':>6s} | {'tok/s':>7s} {'MFU pre':>7s} {'MBU dec':>7s} "
          f"| {'compile s':>9s}")


def format_row(r: dict) -> str:
    lay = f"{r['prefill_layout']}:{r['decode_layout']}@{r['mesh']}"
    ms = 1e3
    wkv = f"{r['weights']}/{r.get('kv_cache', '?')}"
    return (f"{lay:34s} {wkv:9s} {r['batch']:3d} {r['input_len']:5d} | {r['ttft_s'] * ms:9.1f} "
            f"{r['predicted_ttft_s'] * ms:9.1f} {r['ttft_rel_err']:+6.0%} | "
            f"{r['decode_p50_s'] * ms:6.1f}/{r['decode_p90_s'] * ms:6.1f}/{r['decode_p99_s'] * ms:6.1f} "
            f"{r['predicted_decode_s'] * ms:7.1f} {r['decode_rel_err']:+6.0%} | {r['tokens_per_s']:7.1f} "
            f"{r['prefill_mfu']:7.1%} {r['decode_mbu']:7.1%} | {r['compile_s']:9.1f}")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def error_summary(rows: list[dict]) -> dict:
    """Median and worst absolute relative error of predicted latency: over every TTFT and decode
    number (top level), and for prefill (TTFT) and decode (p50 step) separately."""
    def stats(errs: list[float]) -> dict:
        return {"n": len(errs), "median_abs_rel_err": statistics.median(errs) if errs else 0.0,
                "max_abs_rel_err": max(errs, default=0.0)}

    pre = [abs(r["ttft_rel_err"]) for r in rows]
    dec = [abs(r["decode_rel_err"]) for r in rows]
    return {**stats(pre + dec), "prefill": stats(pre), "decode": stats(dec)}


def summary_lines(summary: dict, chip: str) -> list[str]:
    def line(what: str, s: dict) -> str:
        return (f"{what:8s} |relative error| over {s['n']:3d} numbers: median {s['median_abs_rel_err']:6.1%}, "
                f"worst {s['max_abs_rel_err']:6.1%}")

    return [line("prefill", summary["prefill"]), line("decode", summary["decode"]),
            line("overall", summary) + f"  (chip spec {chip})"]


def host_summary(rows: list[dict]) -> dict | None:
    """The host checks of a run (bytes/s per device): median, range, and the chip spec's bandwidth
    the predictions used; None without checks."""
    bws = [r["host_mem_bw"] for r in rows if "host_mem_bw" in r]
    if not bws:
        return None
    return {"n": len(bws), "median": statistics.median(bws), "min": min(bws), "max": max(bws),
            "chip_spec": rows[0]["chip_mem_bw"]}


HOST_DRIFT_WARN = 0.15  # warn when the host's median bandwidth is this far from the spec's


def host_lines(h: dict | None) -> list[str]:
    """What the host checks say, and a warning when the host moved away from its calibration."""
    if not h:
        return []
    gb = 1e9
    lines = [f"memory bandwidth after each configuration: median {h['median'] / gb:.1f} GB/s per device "
             f"({h['min'] / gb:.1f}-{h['max'] / gb:.1f} over {h['n']} checks); the chip spec says "
             f"{h['chip_spec'] / gb:.1f}"]
    drift = h["median"] / h["chip_spec"] - 1
    if abs(drift) > HOST_DRIFT_WARN:
        lines.append(f"warning: the host streams {abs(drift):.0%} {'faster' if drift > 0 else 'slower'} than when "
                     "the chip spec was measured; memory-bound predictions are off by about as much "
                     "(re-run `meshlm calibrate` for this host's current speed)")
    return lines


def decode_curve(cfg, chip, layout, max_len: int, up_to: int) -> list[list[float]]:
    """[batch, predicted seconds per decode step] at batches 1, 2, 3, 4, 6, 8, ... up to `up_to`
    over the engine's dense cache of max_len positions: the cost model's tokens/s curve."""
    from meshlm.costmodel import estimate

    bs = sorted({b for k in range(up_to.bit_length() + 1) for b in (1 << k, 3 << k >> 1) if 1 <= b <= up_to})
    return [[b, estimate(cfg, chip, layout, "decode", b, max(1, max_len - 1), 1).step_latency_s] for b in bs]


def plot(rows: list[dict], path: str, chip=None) -> None:
    """Decode tokens/s against batch, measured (points) and predicted (lines), one colour per
    (weights, input length, layouts); the memory/compute ridge batch of the chip marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        w = r["weights"] + (f"/kv-{r['kv_cache']}" if r.get("kv_cache", "f32") != "f32" else "")
        groups.setdefault((w, r["input_len"], r["decode_layout"], r["mesh"]), []).append(r)
    for (w, L, dec, mesh), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        # the cost model's curve over every batch (rows of one group share the cache length, so the
        # largest batch's curve covers the others); the predicted points of the measured batches otherwise
        curve = rs[-1].get("predicted_decode_curve") or [[r["batch"], r["predicted_decode_s"]] for r in rs]
        line, = ax.plot([c[0] for c in curve], [c[0] / c[1] for c in curve], "-", alpha=0.7)
        ax.plot(b, [r["tokens_per_s"] for r in rs], "o", color=line.get_color(),
                label=f"{w} L={L} {dec}@{mesh}")
        if chip is not None:
            # batch where 2 FLOPs per weight per sequence take as long as reading the weight once
            ridge = chip.flops_for(w) * {"int8": 1, "bf16": 2}.get(w, 4) / (2 * chip.mem_bw)
            ax.axvline(ridge, color=line.get_color(), ls=":", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode throughput: measured (points) vs cost model (lines); dotted: ridge batch")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Config", "load_host", "prompts", "deploy_config", "measure", "run_once", "predict",
           "utilization", "decode_bytes_per_device", "configs", "run", "on_prompts", "machine", "write_json",
           "table", "format_row", "rel_err", "decode_stats", "merge_visits", "error_summary", "summary_lines",
           "HostCheck", "host_summary", "host_lines", "decode_curve", "plot"]
