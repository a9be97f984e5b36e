"""Every code path of the CPU kernels is checked on any x86 host, not only the one the host's CPU
selects: the kernel tests run again in a fresh process with MESHLM_KERNEL_ISA set to each lower
path (AVX2 + FMA where the CPU has AVX-512; portable loops everywhere). Without this, CI on an
AVX-512 machine would never compile the AVX2 code that Zen 2/3 and many Intel parts run."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshlm import kernels
from meshlm.bench import cpuinfo

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_decode_attention.py", "tests/test_decoder_layer.py"]


def _env(isa: str) -> dict:
    env = dict(os.environ, MESHLM_KERNEL_ISA=isa)
    env.pop("MESHLM_HOME", None)  # the child's conftest makes its own (its own kernel build cache)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA flags are x86's"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on PATH"),
    pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable here"),
]


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_kernel_tests_pass_on_each_lower_code_path(isa):
    if isa == kernels.isa():
        pytest.skip(f"{isa} is this CPU's own path: the kernel tests already ran on it")
    if isa == "avx2" and not {"avx2", "fma"} <= set(cpuinfo().get("flags", "").split()):
        pytest.skip("this CPU has no AVX2 + FMA")
    built = subprocess.run([sys.executable, "-c", "from meshlm import kernels; print(kernels.isa())"],
                           env=_env(isa), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.stdout.strip().splitlines()[-1:] == [isa], built.stdout + built.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         env=_env(isa), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]  # e.g. "66 passed in 31.2s": none skipped on this path
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]


def test_an_unknown_isa_is_refused_with_a_reason():
    out = subprocess.run([sys.executable, "-c", "from meshlm import kernels; print(kernels.isa()); print(kernels.reason())"],
                         env=_env("avx9000"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "None" and "MESHLM_KERNEL_ISA='avx9000' is not one of native, avx2, portable" in lines[1], out
