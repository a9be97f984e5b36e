"""Helpers of the benchmark scripts that their numbers rest on: the plain read that
benchmarks/stream_sizes.py measures the weight streams against reads every byte it is given, on any
thread count and size, and its table prints from the rows the script writes; benchmarks/vs_llamacpp.py
compares the engines by the medians of their visits and refuses a visit count below 1."""

import ctypes
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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
    read = _script("stream_sizes").plain_reader()
    buf = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    got = ctypes.c_uint64()
    seconds = read(buf.ctypes.data, nbytes, threads, 3, 4096, ctypes.byref(got))
    assert seconds >= 0
    assert got.value == 3 * _expected(buf) % 2**64


def test_table_prints_curves_reads_and_ratios(capsys):
    rows = [{"weights": "int8", "bytes": 64 << 20, "gb_per_s": 27.0, "vs_read": 0.9},
            {"weights": "int8", "bytes": 64 << 20, "gb_per_s": 29.0, "vs_read": 1.0},
            {"weights": "read x2", "bytes": 64 << 20, "gb_per_s": 30.0}]
    _script("stream_sizes").print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[1].split("|")[1:] == ["     28.0 ", "     30.0 ", "        95%"]


def test_comparison_takes_the_median_of_each_engines_visits():
    median_visit = _script("vs_llamacpp").median_visit
    visits = [{"ttft_s": 0.30, "decode_p50_s": 0.0050, "tokens": [[1, 2]], "weights": "int8"},
              {"ttft_s": 0.10, "decode_p50_s": 0.0030, "tokens": [[3, 4]], "weights": "int8"},
              {"ttft_s": 0.20, "decode_p50_s": 0.0040, "tokens": [[5, 6]], "weights": "int8"}]
    m = median_visit(8, visits)
    assert (m["ttft_s"], m["decode_p50_s"]) == (0.20, 0.0040)
    assert m["tokens_per_s"] == pytest.approx(8 / 0.0040)
    assert m["tokens"] == [[1, 2]]  # greedy tokens are compared from the first visit
    assert median_visit(1, visits[:2])["decode_p50_s"] == pytest.approx(0.0040)  # even: the mean of the middle two


@pytest.mark.parametrize("flag", ["--visits", "--repeats"])
def test_comparison_refuses_fewer_than_one_visit_or_repeat(flag, capsys):
    with pytest.raises(SystemExit) as e:
        _script("vs_llamacpp").main([flag, "0"])
    assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
