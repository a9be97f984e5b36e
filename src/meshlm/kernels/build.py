"""Compile kernel sources with the system g++ into a shared library, cached by content.

The cache key hashes the source, the compiler command, the compiler version, the FFI headers' jax
version and the CPU (flags from /proc/cpuinfo: -march=native code must not run on another CPU).
Builds write to a temporary name and rename it into place, so two processes (pytest-xdist
workers) building at once both end up with a complete library."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from meshlm.paths import home

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")


class BuildError(Exception):
    """The library could not be built; the message says why in one line."""


def cache_dir() -> Path:
    return home() / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def build(sources: list[Path], name: str, include_dir: str, tag: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The path of a shared library `name` compiled from the .cc files of `sources` (headers they
    include listed too, so they enter the cache key), with `extra_flags` after the usual ones; built now
    unless cached."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx}) on PATH")
    cmd = [cxx, *FLAGS, *extra_flags, f"-I{include_dir}"]
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sources), " ".join(cmd).encode(), _compiler_version(cxx).encode(),
                 tag.encode(), _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    out_dir = cache_dir()
    lib = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        cc = [str(s) for s in sources if s.suffix == ".cc"]
        res = subprocess.run([*cmd, *cc, "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            errors = [ln for ln in res.stderr.splitlines() if "error" in ln] or res.stderr.splitlines()[-1:]
            raise BuildError(f"{cxx} failed on {name}: {errors[0] if errors else res.returncode}")
        os.replace(tmp, lib)  # atomic: a concurrent reader sees no file or a complete one
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{cxx} timed out on {name}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib
