"""Where meshlm keeps files between runs: $MESHLM_HOME (default ~/.cache/meshlm) holds the local
calibration (local.json), compiled CPU kernels (kernels/) and XLA's compilation cache (xla/); and how
the MESHLM_* switches read."""

from __future__ import annotations

import os
from pathlib import Path


def switched_off(var: str) -> bool:
    """Whether the environment turns a default-on feature off (MESHLM_KERNELS=0, MESHLM_HUGEPAGES=off, ...)."""
    return os.environ.get(var, "1").strip().lower() in ("0", "false", "no", "off")


def home() -> Path:
    return Path(os.environ.get("MESHLM_HOME", Path.home() / ".cache" / "meshlm"))


def enable_compile_cache() -> None:
    """Persist XLA executables in $MESHLM_HOME/xla so a second run of the same model and shapes
    skips compilation (the unrolled layers take seconds to compile on CPU). MESHLM_COMPILE_CACHE=0
    turns it off; a cache directory the user set for JAX is kept."""
    import jax

    if os.environ.get("MESHLM_COMPILE_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(home() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
