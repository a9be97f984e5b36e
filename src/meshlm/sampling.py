"""Token sampling inside the jitted prefill/decode steps: greedy, temperature, top-k, top-p, seeds.

Every parameter is per sequence (arrays over B), so one compiled step serves a batch that mixes
greedy and sampled requests. Randomness is a pure function of (seed, position) per sequence: a
prompt samples the same tokens alone or in any batch, in any slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from meshlm import kernels
from meshlm.errors import MeshlmError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    ignore_eos: bool = False  # keep going past EOS tokens (benchmarks, parity tests)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise MeshlmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MeshlmError(f"top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MeshlmError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise MeshlmError(f"max tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.seed < 2**31:
            raise MeshlmError(f"seed must be in [0, 2^31), got {self.seed}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


def batch_arrays(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-sequence sampling parameters as host arrays (the jitted steps' inputs)."""
    return {"temperature": np.array([p.temperature for p in params], np.float32),
            "top_k": np.array([p.top_k for p in params], np.int32),
            "top_p": np.array([p.top_p for p in params], np.float32),
            "seed": np.array([p.seed for p in params], np.int32)}


def sample(logits, positions, sp: dict) -> jax.Array:
    """logits [B, V], positions [B] (of the token being chosen) -> token ids [B] int32.

    Greedy rows take the argmax; the sort that top-k/top-p need runs only when some row samples."""
    logits = logits.astype(jnp.float32)
    greedy = argmax(logits)
    return jax.lax.cond(jnp.any(sp["temperature"] > 0), lambda: _sampled(logits, positions, sp, greedy),
                        lambda: greedy)


def argmax(logits) -> jax.Array:
    """The first index of each row's max, [B, V] -> [B] int32; a row with NaN gives 0. On CPU the
    kernel (meshlm.kernels.argmax: one pass, rows cut over the threads); elsewhere `xla_argmax`."""
    if kernels.enabled() and logits.ndim == 2:
        return jax.lax.platform_dependent(logits, cpu=kernels.argmax, default=xla_argmax)
    return xla_argmax(logits)


def xla_argmax(logits) -> jax.Array:
    """argmax as a max and a min, which XLA:CPU vectorizes (its variadic argmax reduce took 0.26 ms
    over SmolLM2's 49152 logits; this ~0.04-0.2 ms single-threaded). XLA's max skips NaNs, so a row
    holding one is set to 0 explicitly."""
    V = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.where((idx < V) & ~jnp.any(jnp.isnan(logits), axis=-1), idx, 0)


def _sampled(logits, positions, sp, greedy):
    B, V = logits.shape
    temp = sp["temperature"]
    scaled = logits / jnp.where(temp > 0, temp, 1.0)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V] largest first
    k = jnp.where(sp["top_k"] > 0, jnp.minimum(sp["top_k"], V), V)
    in_k = jnp.arange(V)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
    keep = in_k & ((jnp.cumsum(probs, axis=-1) - probs) < sp["top_p"][:, None])
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(sp["seed"], positions)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temp > 0, drawn, greedy)
