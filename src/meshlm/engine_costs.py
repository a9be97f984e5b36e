"""The engine's fixed costs (`meshlm calibrate`, after the chip is measured): tiny models timed
through the real engine, and what the cost model with the measured rates does not explain of
their times fitted as per-pass, per-layer, per-logit and per-activation-element seconds.
(Fitting the attention terms on these tiny models too extrapolated badly: 8 ns per decode score
where the engine's decode attention reads the cache at the memory bandwidth; calibrate.py measures
them directly.)"""

from __future__ import annotations

import statistics

import jax
import numpy as np

# ---- the engine's fixed costs ----------------------------------------------------------------------
# (n_layers, vocab, batch, prompt length, KV heads, d_model) of the tiny models timed through the
# engine: two depths (per-layer slope), two vocabularies and batches (sampling over B x V), short and
# long prompts. d_model 64 keeps every weight in cache, so what the cost model (with the attention
# terms measured directly, measure_attention) does not explain is the engine's fixed cost per pass,
# per layer and per sampled logit. The last two are as wide as a small LLM (d_model 512, 8 heads)
# and identify the activation-element term: 512 tokens keep a layer's activations in the last-level
# cache (0.3-0.45 ns per element), 4096 stream them through memory (1.2-1.45 ns). Fitted on the
# short one alone it came out at 0.04-0.6 ns and left the bench's large prefills (8192-16384 rows)
# under-predicted by up to 49%; on both, 0.34-0.87. (Fitted on 4096 tokens of d_model 64 it came out
# at 1.6-2.1 ns: narrow rows cost more per element.)
ENGINE_RUNS = ((2, 512, 1, 16, 2, 64), (8, 512, 1, 16, 2, 64), (2, 32768, 1, 16, 2, 64), (2, 32768, 8, 16, 2, 64),
               (2, 512, 4, 1024, 2, 64), (8, 512, 2, 1024, 2, 64), (2, 512, 4, 1024, 4, 64),
               (2, 512, 16, 32, 2, 512), (2, 512, 16, 256, 2, 512))
ENGINE_REPEATS = 5  # round-robin passes over the tiny models
ENGINE_RUNS_QUICK = ((2, 512, 1, 16, 2, 64), (8, 512, 1, 16, 2, 64), (2, 4096, 4, 128, 2, 64))
# (field, phase) of every fitted coefficient: a unit value of each gives its regressor
OVERHEAD_TERMS = (("pass_overhead_s", "prefill"), ("layer_overhead_s", "prefill"), ("pass_overhead_s", "decode"),
                  ("layer_overhead_s", "decode"), ("logit_elem_s", None), ("act_elem_s", "prefill"))


def tiny_config(n_layers: int, vocab: int, max_len: int, n_kv_heads: int = 2, d_model: int = 64):
    from meshlm.config import ModelConfig

    return ModelConfig(name=f"calibration-{n_layers}x{vocab}x{d_model}", n_layers=n_layers, d_model=d_model,
                       d_ff=2 * d_model, n_heads=max(4, d_model // 64), n_kv_heads=n_kv_heads, d_head=64, vocab=vocab,
                       max_seq_len=max_len)


def _with_terms(chip, values: dict):
    """`chip` with the fixed-cost coefficients `values` ({(field, phase): seconds}) and no other
    fixed costs (its measured attention terms are kept)."""
    import dataclasses

    fields = {"pass_overhead_s": (), "layer_overhead_s": (), "act_elem_s": (), "logit_elem_s": 0.0}
    for (f, phase), v in values.items():
        fields[f] = fields[f] + ((phase, v),) if phase else v
    return dataclasses.replace(chip, **fields)


def engine_samples(chip, devices=None, quick: bool = False, log=print) -> list[dict]:
    """Prefill and decode seconds of the tiny models of ENGINE_RUNS through the real engine, with
    what the cost model predicts for them on `chip` without overheads, and the regressors (the
    prediction's change for a unit value of each term of OVERHEAD_TERMS)."""
    from meshlm import reference
    from meshlm.bench import prompts, run_once
    from meshlm.deploy import predict_engine
    from meshlm.deploy import ShardedBackend
    from meshlm.engine import Engine
    from meshlm.layouts import Layout, MeshShape
    from meshlm.sharded import ShardedModel

    devices = list(jax.devices() if devices is None else devices)
    mesh = MeshShape(1, 1, len(devices))
    weights = "f32" if devices[0].platform == "cpu" else "bf16"
    lay = Layout("ws2d", "heads", weights, mesh)
    layouts = {"prefill": lay, "decode": lay}
    steps, repeats = (3, 2) if quick else (8, ENGINE_REPEATS)
    base_chip = _with_terms(chip, {})
    runs = ENGINE_RUNS_QUICK if quick else ENGINE_RUNS
    engines = []
    for Y, V, B, L, K, E in runs:
        cfg = tiny_config(Y, V, L + steps + 2, K, E)
        sm = ShardedModel(cfg, mesh, devices)
        params = sm.shard_params(reference.init_params(cfg, jax.random.key(0)), weights=weights)
        eng = Engine(ShardedBackend(sm, lay, params), params, slots=B, max_len=L + steps + 2)
        ps = prompts(B, L, V)
        run_once(eng, ps, 2)  # compiles prefill, insert and decode
        engines.append((cfg, eng, ps))
    # round-robin over the models (as _interleaved): each sees the same mix of load
    ttfts: list[list[float]] = [[] for _ in runs]
    dec: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, (_, eng, ps) in enumerate(engines):
            t, st = run_once(eng, ps, steps)
            ttfts[i].append(t)
            dec[i] += st
    out = []
    for (Y, V, B, L, K, E), (cfg, eng, _), tt, dd in zip(runs, engines, ttfts, dec):
        measured = {"prefill": statistics.median(tt), "decode": statistics.median(dd)}
        base = predict_engine(cfg, base_chip, layouts, eng)
        units = [predict_engine(cfg, _with_terms(chip, {t: 1.0}), layouts, eng) for t in OVERHEAD_TERMS]
        for phase, key in (("prefill", "ttft_s"), ("decode", "decode_s")):
            out.append({"phase": phase, "n_layers": Y, "vocab": V, "batch": B, "input_len": L, "kv_heads": K,
                        "d_model": E, "measured_s": measured[phase], "base_s": base[key],
                        "regressors": [u[key] - base[key] for u in units]})
        log(f"  engine {Y} layers, V={V}, B={B}, L={L}, K={K}, E={E}: prefill {measured['prefill'] * 1e3:.2f} ms, "
            f"decode {measured['decode'] * 1e3:.2f} ms/step")
    return out


# Long tiny-model prompts stay out of the prefill fit (their decode steps stay in): their residual
# is attention of another shape (d_model 64, 4 x 64 heads over 2 KV) than the one
# measure_attention prices (3 KV x 3 heads), 40-50 ms of 100-250, and fitted alongside it pushed
# act_elem_s to 1.2-3.3 ns per element where the wide model's short prompts give 0.3-0.5 (one
# calibration at 3.3 over-predicted every SmolLM2 prefill of a grid by 26-58%).
FIT_PREFILL_MAX_LEN = 256


def fit_overheads(samples: list[dict]) -> dict:
    """Non-negative least squares of (measured - base) on the regressors, each sample weighted by
    1/measured (relative error, so the long prefills do not drown the short decode steps), over
    every sample but prefills longer than FIT_PREFILL_MAX_LEN.
    Returns {(field, phase): seconds} for OVERHEAD_TERMS."""
    samples = [s for s in samples if s["phase"] != "prefill" or s["input_len"] <= FIT_PREFILL_MAX_LEN]
    A = np.array([s["regressors"] for s in samples], float)
    r = np.array([s["measured_s"] - s["base_s"] for s in samples], float)
    w = 1.0 / np.array([s["measured_s"] for s in samples], float)
    A, r = A * w[:, None], r * w
    free = [j for j in range(A.shape[1]) if np.any(A[:, j])]  # a term no sample exercises stays 0
    coef = np.zeros(A.shape[1])
    while free:  # active set: drop the most negative coefficient and refit until none is negative
        c, *_ = np.linalg.lstsq(A[:, free], r, rcond=None)
        if (c >= 0).all():
            coef[free] = c
            break
        free.pop(int(np.argmin(c)))
    return {t: float(v) for t, v in zip(OVERHEAD_TERMS, coef)}


def overhead_fields(terms: dict) -> dict:
    """{(field, phase): seconds} -> the ChipSpec JSON fields."""
    out: dict = {"pass_overhead_s": {}, "layer_overhead_s": {}, "act_elem_s": {}}
    for (f, phase), v in terms.items():
        if phase:
            out[f][phase] = v
        else:
            out[f] = v
    return out


def calibrate_engine(spec: dict, devices=None, quick: bool = False, log=print) -> tuple[dict, list[dict]]:
    """The overhead fields of `spec` (a measured chip dict) fitted on engine_samples, and the
    samples with their fitted predictions (`fitted_s`)."""
    from meshlm.hardware import chip_from_dict

    chip = chip_from_dict(spec, where="measured spec")
    log(f"engine fixed costs: {len(ENGINE_RUNS_QUICK if quick else ENGINE_RUNS)} tiny models (d_model 64, two 512) ...")
    samples = engine_samples(chip, devices, quick, log)
    terms = fit_overheads(samples)
    coef = np.array([terms[t] for t in OVERHEAD_TERMS])
    for s in samples:
        s["fitted_s"] = s["base_s"] + float(np.dot(s["regressors"], coef))
    return overhead_fields(terms), samples
