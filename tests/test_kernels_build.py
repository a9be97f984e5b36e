"""The CPU kernels build wherever a C++ compiler is present: every kernel test skips when they are
unavailable, so a source that stopped compiling would otherwise pass CI silently."""

import os
import shutil
import subprocess

import pytest

from meshlm import kernels


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on PATH")
@pytest.mark.skipif(os.environ.get("MESHLM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"),
                    reason="kernels disabled by MESHLM_KERNELS")
def test_kernels_build_with_the_compiler_here():
    assert kernels.available(), kernels.reason()


# The int8 weight stream's software prefetch, per code path (matmul.h: stream_ahead): GCC 12 once
# compiled a three-way choice of prefetch loops into nothing, and the decode step ran 25% slower with
# every test passing. The library must hold the stream's hint.
STREAM_HINT = {"avx2": "prefetchnta"}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump on PATH")
def test_the_weight_stream_prefetch_survives_compilation():
    if not kernels.available() or kernels.isa() not in STREAM_HINT:
        pytest.skip("no kernels here, or a code path without a pinned stream hint")
    lib = kernels._state["lib"]._name
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib], capture_output=True, text=True, timeout=300)
    kernel = [ln for ln in out.stdout.split("\n\n") if "meshlm::matmul::packed_cols<1, 8, signed char>" in ln.split("\n")[0]]
    assert kernel, "packed_cols<1, 8, int8> not found in the library"
    assert any(STREAM_HINT[kernels.isa()] in block for block in kernel), kernel[0][:2000]
