"""Build the canonical params tree (see notes/model_api.md) leaf by leaf and place each leaf
straight onto its devices.

A loader describes a checkpoint as *recipes*: for every leaf path ("embed", "layers/wq", ...) a
function that returns that leaf for one layer (or the whole leaf for non-layer leaves) as a numpy
array in host memory. `assemble` stacks one leaf over layers on the host, checks its shape
against the config, and hands it to a `Placer`, which turns it into a device array: a single
device for the unsharded reference, or `jax.make_array_from_callback` with the leaf's sharding so
each device receives only its own shard (a sharded model is never assembled on one device).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshlm.config import ModelConfig
from meshlm.errors import MeshlmError

Placer = Callable[[str, np.ndarray], Any]  # (leaf path "layers/wq", host array) -> device array
Recipe = Callable[[int], np.ndarray]  # layer index -> per-layer array (ignored index for globals)


def leaf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every leaf of the canonical params tree for this config, with its global shape."""
    E, F, H, K, D, V, Y = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.vocab, cfg.n_layers
    has_norm_bias = cfg.norm == "layernorm" and cfg.norm_bias
    s: dict[str, tuple[int, ...]] = {"embed": (V, E), "final_norm/scale": (E,)}
    if has_norm_bias:
        s["final_norm/bias"] = (E,)
    if not cfg.tie_embeddings:
        s["lm_head"] = (E, V)
    if cfg.lm_head_bias:
        s["lm_head_bias"] = (V,)
    norms = ["attn_norm"] + (["mlp_norm"] if cfg.block == "serial" or cfg.parallel_norms == 2 else [])
    for n in norms:
        s[f"layers/{n}/scale"] = (Y, E)
        if has_norm_bias:
            s[f"layers/{n}/bias"] = (Y, E)
    s.update({"layers/wq": (Y, E, H, D), "layers/wk": (Y, E, K, D), "layers/wv": (Y, E, K, D),
              "layers/wo": (Y, H, D, E)})
    if cfg.qkv_bias:
        s.update({"layers/bq": (Y, H, D), "layers/bk": (Y, K, D), "layers/bv": (Y, K, D)})
    if cfg.out_bias:
        s["layers/bo"] = (Y, E)
    mlp_in = ["w_gate", "w_up"] if cfg.gated_mlp else ["w_in"]
    for w in mlp_in:
        s[f"layers/{w}"] = (Y, E, F)
    s["layers/w_out"] = (Y, F, E)
    if cfg.mlp_bias:
        for w in mlp_in:
            s[f"layers/b{w[1:]}"] = (Y, F)
        s["layers/b_out"] = (Y, E)
    return s


def single_device_placer(dtype=jnp.float32, device: jax.Device | None = None) -> Placer:
    """Place every leaf whole on one device (the unsharded reference model)."""
    dev = device or jax.devices()[0]
    return lambda path, a: jax.device_put(np.asarray(a, dtype=dtype), dev)


def sharded_placer(shardings: Mapping[str, jax.sharding.Sharding], dtype=jnp.float32) -> Placer:
    """Place each leaf with its sharding: every device receives only its own slice of the host array."""
    def place(path: str, a: np.ndarray):
        if path not in shardings:
            raise MeshlmError(f"no sharding given for parameter {path!r}")
        host = np.asarray(a, dtype=dtype)
        return jax.make_array_from_callback(host.shape, shardings[path], lambda idx: host[idx])
    return place


def set_leaf(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def assemble(cfg: ModelConfig, recipes: Mapping[str, Recipe], place: Placer, *, source: str,
             progress: bool = True) -> dict:
    """Stack, check and place every leaf the config needs; `source` names the checkpoint in errors."""
    shapes = leaf_shapes(cfg)
    missing = [p for p in shapes if p not in recipes]
    if missing:  # a mapping bug, not a user error: the architecture's recipe set is incomplete
        raise AssertionError(f"no recipe for {missing}")
    params: dict = {}
    with _progress(progress, len(shapes), f"loading {cfg.name}") as advance:
        for path, shape in shapes.items():
            fn = recipes[path]
            if path.startswith("layers/"):
                host = np.stack([np.asarray(fn(i), np.float32) for i in range(cfg.n_layers)])
            else:
                host = np.asarray(fn(0), np.float32)
            if host.shape != shape:
                raise MeshlmError(f"{source}: parameter {path} has shape {list(host.shape)}, the config "
                                  f"implies {list(shape)}")
            if not np.isfinite(host).all():
                raise MeshlmError(f"{source}: parameter {path} contains NaN or infinite values (corrupted?)")
            set_leaf(params, path, place(path, host))
            del host
            advance()
    return params


class _progress:
    """A rich progress bar on stderr (only when stderr is a terminal and progress is wanted)."""

    def __init__(self, enabled: bool, total: int, label: str):
        import sys
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.label = total, label

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
