"""The CPU kernels build wherever a C++ compiler is present: every kernel test skips when they are
unavailable, so a source that stopped compiling would otherwise pass CI silently."""

import os
import shutil

import pytest

from meshlm import kernels


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on PATH")
@pytest.mark.skipif(os.environ.get("MESHLM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"),
                    reason="kernels disabled by MESHLM_KERNELS")
def test_kernels_build_with_the_compiler_here():
    assert kernels.available(), kernels.reason()
