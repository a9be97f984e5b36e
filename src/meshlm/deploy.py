"""Serve a checkpoint on the local devices: pick a mesh and a layout per phase with the planner
(unless forced), load the weights once onto the mesh, and build the engine.

    d = deploy("default", n_devices=8)                     # SmolLM2 on 8 (simulated) devices
    d = deploy(path, mesh=MeshShape(2, 2, 2), prefill="wg-xyz/heads", decode="ws2d/batch", quantize="int8")
    for delta in d.text.stream("The capital of France is", SamplingParams(max_tokens=16)): ...

Both phases read ONE copy of the weights (the shared storage E_x F_yz, or E F_xyz when both
phases run ws1d). Prefill fills a cache laid out for its own attention layout; when decode's
differs, the cache is converted once per prefill batch, before insert.

The chip spec priced by the planner: the local calibration (`meshlm calibrate`) when present,
the vendor spec for known GPUs/TPUs, else `generic_cpu_spec` (documented numbers of a small
2-core host, split evenly over the simulated devices that share it).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from meshlm import comm
from meshlm.checkpoints import LoadedModel, load_model
from meshlm.config import ModelConfig
from meshlm.costmodel import Estimate, estimate
from meshlm.engine import DEFAULT_STEPS_PER_DISPATCH, Engine, TextGenerator
from meshlm.errors import MeshlmError
from meshlm.hardware import CHIPS, ChipSpec, load_chip, local_spec_path
from meshlm.layouts import KV_FORMATS, Layout, MeshShape, parse_phase_layout
from meshlm.paths import enable_compile_cache
from meshlm.planner import best_layout
from meshlm.sharded import ShardedModel


class ShardedBackend:
    """One layout of the sharded model as an engine `Backend` (jitted passes traced into the engine's steps)."""

    def __init__(self, sm: ShardedModel, layout: Layout, params):
        self.sm, self.layout, self.cfg = sm, layout, sm.cfg
        self.batch_multiple = comm.batch_multiple(layout)
        sm.check_params(layout, params)
        # built once with the concrete params (their shardings give the shard_map specs)
        self._prefill = sm.pass_fn(layout, "prefill", False, params)
        self._decode = sm.pass_fn(layout, "decode", False, params)

    def init_cache(self, batch, max_len):
        return self.sm.init_cache(self.layout, batch, max_len)

    def prefill(self, params, tokens, lengths, cache):
        logits, cache = self._prefill(params, tokens, lengths, cache)
        return logits[:, 0], cache

    def decode(self, params, cache, tokens, positions):
        logits, cache = self._decode(params, tokens[:, None], positions, cache)
        return logits[:, 0], cache

    def adopt_cache(self, cache, source: "ShardedBackend"):
        """A prefill cache laid out for `source` -> laid out for this backend's attention."""
        if comm.attention_axes(source.layout) == comm.attention_axes(self.layout) and \
                self.sm.cache_heads(source.layout) == self.sm.cache_heads(self.layout):
            return cache
        return self.sm.convert_cache(cache, self.layout)


def generic_cpu_spec(n_devices: int) -> ChipSpec:
    """A CPU host split into n simulated devices: ~180 GFLOP/s f32 and ~24 GB/s memory in total
    (measured on the 2-core development host, DESIGN.md); collectives are memory copies."""
    n = max(1, n_devices)
    return ChipSpec(name=f"cpu-generic/{n}", peak_flops=1.8e11 / n, hbm_bytes=16 * 2**30 / n, hbm_bw=2.4e10 / n,
                    link_bw=2.4e10 / n, topology="switch", switch_domain=n, flops_efficiency=1.0,
                    hbm_efficiency=1.0, hop_latency_s=2e-5, act_bytes=4,  # the engine computes and caches in f32 on CPU
                    source="generic CPU host (meshlm.deploy)")


def local_chip(n_devices: int) -> ChipSpec:
    """The spec the planner prices for the local devices (see module docstring)."""
    dev = jax.devices()[0]
    if local_spec_path().is_file():
        chip = load_chip("local")
        # a calibration is per device *as measured*: simulated CPU devices share the host, so a
        # spec measured on another device count would misprice this one
        if dev.platform != "cpu" or chip.switch_domain in (0, n_devices):
            return chip
    kind = dev.device_kind.lower()
    for key, name in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80g"), ("v4", "tpu-v4"),
                      ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v6", "tpu-v6e")):
        if key in kind:
            return CHIPS[name]
    return generic_cpu_spec(n_devices)


@dataclass
class Deployment:
    model: LoadedModel
    chip: ChipSpec
    layouts: dict[str, Layout]  # phase -> layout
    predicted: dict[str, Estimate]  # phase -> the cost model's estimate for the planned workload
    engine: Engine
    text: TextGenerator

    def layouts_json(self) -> dict:
        return {ph: lay.to_dict() | {"short": lay.short} for ph, lay in self.layouts.items()}


def choose_layouts(cfg: ModelConfig, chip: ChipSpec, n: int, mesh: MeshShape | None, weights: str,
                   forced: dict[str, str | None], batch: int, input_len: int, gen_len: int,
                   kv_cache: str | None = None) -> dict[str, Estimate]:
    """Decode's layout (and the mesh) first, then prefill's on that mesh: one copy of the weights."""
    out: dict[str, Estimate] = {}
    for phase in ("decode", "prefill"):
        ffn, attn = parse_phase_layout(forced[phase]) if forced.get(phase) else (None, None)
        meshes = [mesh] if mesh else ([out["decode"].layout.mesh] if out else chip.mesh_shapes(n) or
                                      MeshShape.all_for(n))
        best = None
        for m in meshes:  # the planner may not know every logical mesh: price each explicitly
            try:
                e = best_layout(cfg, chip, n, phase, batch, input_len, gen_len, ffn=ffn, attention=attn,
                                weights=weights, mesh=m, kv_cache=kv_cache)
            except MeshlmError:
                continue
            if best is None or e.latency_s < best.latency_s:
                best = e
        if best is None:
            lay = Layout(ffn or "ws2d", attn or "heads", weights, meshes[0], kv_cache=kv_cache)
            best = estimate(cfg, chip, lay, phase, batch, input_len, gen_len)
        out[phase] = best
    p, d = out["prefill"].layout, out["decode"].layout
    if (p.ffn == "ws1d") != (d.ffn == "ws1d"):
        raise MeshlmError(f"prefill {p.short} and decode {d.short} cannot share one copy of the weights: ws1d "
                          f"stores them as E F_xyz, the others as E_x F_yz; run both phases ws1d or neither")
    return out


def deploy(model: str = "default", *, n_devices: int | None = None, mesh: MeshShape | None = None,
           prefill: str | None = None, decode: str | None = None, quantize: str | None = None,
           slots: int = 1, max_len: int = 512, batch: int | None = None, input_len: int = 16,
           gen_len: int = 32, progress: bool = True, host: LoadedModel | None = None,
           steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH, kv_cache: str | None = None) -> Deployment:
    """Load `model` onto the mesh and build its engine. batch/input_len/gen_len describe the
    expected workload the planner prices (batch defaults to `slots`). `host`: a model already
    loaded with host (numpy) leaves, reused instead of reading `model` again (kept intact).
    kv_cache: the KV cache's format, "f32" or "bf16" (None: the activation dtype, f32 on CPU)."""
    if quantize not in (None, "int8"):
        raise MeshlmError(f"--quantize supports only int8, got {quantize!r}")
    if kv_cache not in (None, *KV_FORMATS):
        raise MeshlmError(f"--kv-cache supports {', '.join(KV_FORMATS)}, got {kv_cache!r}")
    enable_compile_cache()
    avail = len(jax.devices())
    n = mesh.n if mesh else (n_devices or avail)
    if n_devices and mesh and mesh.n != n_devices:
        raise MeshlmError(f"mesh {mesh} has {mesh.n} devices but --devices is {n_devices}")
    if n > avail:
        raise MeshlmError(f"{n} devices requested, {avail} available (on a CPU-only host, --devices N simulates N)")
    # weights stay on the host until the layout (and so each leaf's sharding) is known
    src = host or load_model(model, placer_for=lambda cfg: (lambda path, a: a), progress=progress)
    loaded = LoadedModel(src.cfg, src.params, src.tokenizer, src.source)
    cfg = loaded.cfg
    weights = quantize or ("f32" if jax.devices()[0].platform == "cpu" else "bf16")
    chip = local_chip(n)
    est = choose_layouts(cfg, chip, n, mesh, weights, {"prefill": prefill, "decode": decode},
                         batch or slots, input_len, gen_len, kv_cache)
    lay = {ph: e.layout for ph, e in est.items()}
    sm = ShardedModel(cfg, lay["decode"].mesh)
    storage = "1d" if lay["decode"].ffn == "ws1d" else "2d"
    params = sm.shard_params(loaded.params, weights=weights, storage=storage)
    loaded.params = params  # devices hold their shards only (the host copy is dropped unless `host` keeps it)
    dec, pre = ShardedBackend(sm, lay["decode"], params), ShardedBackend(sm, lay["prefill"], params)
    eng = Engine(dec, params, slots=slots, max_len=max_len, prefill_backend=pre, eos_ids=loaded.tokenizer.eos_ids,
                 steps_per_dispatch=steps_per_dispatch)
    return Deployment(loaded, chip, lay, est, eng, TextGenerator(eng, loaded.tokenizer))


def predict_engine(cfg, chip, layouts: dict, eng) -> dict:
    """The cost model for what the engine `eng` last ran, with its accounting: prefill of the
    padded (B, L) bucket projecting only each prompt's last position to logits; a decode step of
    every slot attending over the whole cache of max_len positions (what XLA's masked attention
    reads; the CPU kernel reads up to each slot's position, which in a bench run is within gen_len
    of the end)."""
    B, L = eng.stats.prefill_shape
    pre = estimate(cfg, chip, layouts["prefill"], "prefill", max(B, 1), max(L, 1), 1, logits="last")
    dec = estimate(cfg, chip, layouts["decode"], "decode", eng.slots, max(1, eng.max_len - 1), 1)
    return {"ttft_s": pre.latency_s, "decode_s": dec.step_latency_s, "prefill": pre, "decode": dec}


def measured_vs_predicted(d: Deployment) -> dict[str, dict[str, float]]:
    """The last run's measured latencies beside the cost model's for exactly what ran (`predict_engine`)."""
    s = d.engine.stats
    B, L = s.prefill_shape
    p = predict_engine(d.model.cfg, d.chip, d.layouts, d.engine)
    return {"prefill": {"predicted_s": p["ttft_s"], "measured_s": s.ttft_s or 0.0, "batch": B, "length": L},
            "decode": {"predicted_s_per_token": p["decode_s"], "measured_s_per_token": s.decode_s_per_step,
                       "batch": d.engine.slots, "steps": s.decode_steps}}


__all__ = ["ShardedBackend", "Deployment", "deploy", "choose_layouts", "local_chip", "generic_cpu_spec",
           "measured_vs_predicted", "predict_engine"]
