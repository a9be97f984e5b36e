"""Helpers of the benchmark scripts that their numbers rest on: the plain read that
benchmarks/stream_sizes.py measures the weight streams against reads every byte it is given, on any
thread count and size, and its table prints from the rows the script writes."""

import ctypes
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _stream_sizes():
    spec = importlib.util.spec_from_file_location("stream_sizes", ROOT / "benchmarks" / "stream_sizes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected(buf: np.ndarray) -> int:
    """The buffer's little-endian 64-bit words and its bytes past the last whole word, summed mod 2^64."""
    words = len(buf) // 8
    total = int(buf[: words * 8].view("<u8").sum(dtype=np.uint64)) if words else 0
    return (total + int(buf[words * 8:].sum())) % 2**64


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("nbytes", [0, 7, 64, 1000, 4096 + 77, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_plain_read_reads_every_byte(nbytes, threads):
    read = _stream_sizes().plain_reader()
    buf = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    got = ctypes.c_uint64()
    seconds = read(buf.ctypes.data, nbytes, threads, 3, 4096, ctypes.byref(got))
    assert seconds >= 0
    assert got.value == 3 * _expected(buf) % 2**64


def test_table_prints_curves_reads_and_ratios(capsys):
    rows = [{"weights": "int8", "bytes": 64 << 20, "gb_per_s": 27.0, "vs_read": 0.9},
            {"weights": "int8", "bytes": 64 << 20, "gb_per_s": 29.0, "vs_read": 1.0},
            {"weights": "read x2", "bytes": 64 << 20, "gb_per_s": 30.0}]
    _stream_sizes().print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[1].split("|")[1:] == ["     28.0 ", "     30.0 ", "        95%"]
