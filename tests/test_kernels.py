"""The int8 CPU kernels (meshlm.kernels) against float64 numpy, the XLA fallback, and the ways the
engine calls them: quant.dot_rows / dot_t under jit, lax.scan, shard_map on 8 devices, donation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshlm import kernels, quant

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.reason()}")

# (M, R, C): odd sizes hit every edge (C not a multiple of 16/64/128, R not of 16, M not of 4);
# the last two are large enough (> 256 KiB of int8) to be split over the thread pool.
SHAPES = [(2, 0, 3), (0, 5, 3), (1, 1, 1), (1, 17, 37), (3, 31, 129), (8, 100, 64), (33, 65, 200), (64, 257, 130),
          (2, 1536, 577), (1, 576, 3648), (5, 515, 1090)]


def _case(M, R, C, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(M, R)).astype(np.float32), rng.integers(-127, 128, size=(R, C), dtype=np.int8)


def _close(got, want):
    """Max error relative to max |y|: 1e-5 (f32 accumulation); a wrong tile or edge is O(1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    if want.size:
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), np.max(np.abs(got - want))


@pytest.mark.parametrize("M,R,C", SHAPES)
def test_kernels_match_float64(M, R, C):
    x, q = _case(M, R, C)
    want = x.astype(np.float64) @ q.astype(np.float64)
    _close(jax.jit(kernels.int8_matmul)(x, q), want)
    _close(jax.jit(kernels.int8_matmul_t)(x, np.ascontiguousarray(q.T)), want)


# packed panel-major weights: C a multiple of 64; M = 1 (the streaming path), 2-7, 13 and 33 (register
# tiles of up to 6 rows and their tails), R odd (the even/odd accumulators' last row); the last six are
# split over threads by equal row ranges of the weight: up to 8 rows one per thread, cutting a panel
# (1 x 576 x 960, 8 x 1537 x 576), both shares inside one panel (2 x 3001 x 64), a share ending and
# the next starting inside the middle panel (1 x 1000 x 192); more rows four per thread (16 x 1537 x 576);
# past kRangeSplitMaxM (128) rows whole panels (160 x 600 x 192).
PACKED_SHAPES = [(1, 1, 64), (1, 17, 128), (2, 31, 64), (3, 100, 192), (5, 65, 320), (6, 70, 128), (7, 40, 64),
                 (13, 300, 192), (33, 257, 128), (1, 576, 960), (8, 1537, 576), (2, 3001, 64), (1, 1000, 192),
                 (16, 1537, 576), (160, 600, 192)]


@pytest.mark.parametrize("M,R,C", PACKED_SHAPES)
def test_packed_kernel_matches_float64_and_unpacks(M, R, C):
    x, q = _case(M, R, C, seed=5)
    p = quant.pack_panels(q)
    assert p.shape == (C // 64, R, 64) and np.array_equal(np.asarray(quant.unpack_panels(jnp.asarray(p))), q)
    _close(jax.jit(kernels.packed_matmul)(x, p), x.astype(np.float64) @ q)
    w = q.astype(np.float32) / 127  # f32 weights, packed the same way
    _close(jax.jit(kernels.packed_matmul)(x, quant.pack_panels(w)), x.astype(np.float64) @ w)
    s = np.linspace(0.5, 2.0, C).astype(np.float32)  # per-column scales applied in the kernel
    _close(jax.jit(kernels.packed_matmul)(x, p, s), (x.astype(np.float64) @ q) * s)


@pytest.mark.parametrize("M", [1, quant.KERNEL_MAX_M_PACKED_AVX2, quant.KERNEL_MAX_M_PACKED_AVX2 + 1, quant.KERNEL_MAX_M,
                               quant.KERNEL_MAX_M + 1])
def test_dot_rows_on_packed_weights_kernel_and_xla_path(M):
    x, q = _case(M, 130, 192, seed=6)
    fn = jax.jit(lambda a, b: quant.dot_rows(a, b, jnp.float32))
    for w, target in ((q, "meshlm_int8_matmul_p"), (q.astype(np.float32) / 127, "meshlm_f32_matmul_p")):
        p = jnp.asarray(quant.pack_panels(w))
        kernel = M <= quant.packed_kernel_max_m(w.dtype == np.int8)
        assert (target in fn.lower(x, p).compile().as_text()) == kernel
        _close(fn(x, p), x.astype(np.float64) @ w)


def test_packed_int8_one_row_integer_path_edges():
    """One row of x against packed int8 runs as integer dot products on x split into three 7-bit
    terms of its largest |x| (matmul.h: packed1_vnni, where the CPU has VNNI): a row of zeros, a
    row spanning 1e-6..1e4 (the small elements rounded at 2^-22 of the largest stay within f32's
    tolerance of the column sums), and non-finite rows, which take the f32 path and come out
    inf/NaN exactly where float64 does."""
    _, q = _case(1, 1000, 192, seed=7)  # split over the threads, a share ending inside a panel
    p = quant.pack_panels(q)
    s = np.linspace(0.5, 2.0, 192).astype(np.float32)
    mm = jax.jit(kernels.packed_matmul)
    zero = np.zeros((1, 1000), np.float32)
    assert np.array_equal(np.asarray(mm(zero, p, s)), np.zeros((1, 192), np.float32))
    rng = np.random.default_rng(8)
    wide = (rng.normal(size=(1, 1000)) * 10.0 ** rng.uniform(-6, 4, size=(1, 1000))).astype(np.float32)
    _close(mm(wide, p, s), (wide.astype(np.float64) @ q) * s)
    for bad in (np.inf, -np.inf, np.nan):
        x = rng.normal(size=(1, 1000)).astype(np.float32)
        x[0, 500] = bad
        got, want = np.asarray(mm(x, p)), x.astype(np.float64) @ q
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
        assert np.array_equal(got[np.isinf(got)], want[np.isinf(want)].astype(np.float32))


def test_every_output_written_and_no_neighbour_clobbered():
    """y is computed in place: a stale or skipped column would keep the buffer's old contents."""
    x, q = _case(3, 40, 131, seed=1)
    x[:, 7] = 1e6  # a huge contribution in every column makes a skipped row of q visible
    want = x.astype(np.float64) @ q
    for _ in range(3):  # fresh output buffers each call
        _close(jax.jit(kernels.int8_matmul)(x, q), want)
        _close(jax.jit(kernels.int8_matmul_t)(x, np.ascontiguousarray(q.T)), want)


def test_shape_errors_are_clear():
    x, q = _case(2, 8, 5)
    with pytest.raises(ValueError, match="int8_matmul"):
        kernels.int8_matmul(x[:, :7], q)
    with pytest.raises(ValueError, match="int8_matmul_t"):
        kernels.int8_matmul_t(x, q)
    with pytest.raises(ValueError, match="int8"):
        kernels.int8_matmul(x, q.astype(np.int16))
    with pytest.raises(ValueError, match="packed"):
        kernels.packed_matmul(x, q)  # not packed


@pytest.mark.parametrize("M", sorted({1, 3, quant.KERNEL_MAX_M_T, quant.KERNEL_MAX_M_T + 1, quant.KERNEL_MAX_M,
                                      quant.KERNEL_MAX_M + 1}))
def test_dot_rows_and_dot_t_use_the_kernel_up_to_the_crossover(M):
    x, q = _case(M, 512, 72, seed=2)
    xj, qj, qt = jnp.asarray(x), jnp.asarray(q), jnp.asarray(np.ascontiguousarray(q.T))
    rows = jax.jit(lambda a, b: quant.dot_rows(a, b, jnp.float32))
    tied = jax.jit(lambda a, b: quant.dot_t(a, b, jnp.float32))
    for fn, w, target, max_m in ((rows, qj, "meshlm_int8_matmul\"", quant.KERNEL_MAX_M),
                                 (tied, qt, "meshlm_int8_matmul_t\"", quant.KERNEL_MAX_M_T)):
        hlo = fn.lower(xj, w).compile().as_text()
        assert (target in hlo) == (M <= max_m)
    want = np.asarray(quant.xla_dot_rows(xj, qj))  # the fallback path
    _close(rows(xj, qj), want)
    _close(tied(xj, qt), want)
    _close(want, x.astype(np.float64) @ q)


def test_dot_rows_inside_scan_and_with_donated_input():
    rng = np.random.default_rng(3)
    qs = rng.integers(-127, 128, size=(3, 96, 96), dtype=np.int8)
    x = rng.normal(size=(4, 96)).astype(np.float32)

    @jax.jit
    def layers(h, ws):
        def body(h, w):
            return quant.dot_rows(h, w, jnp.float32) / 500.0, None
        return jax.lax.scan(body, h, ws)[0]

    want = x.astype(np.float64)
    for w in qs:
        want = want @ w / 500.0
    assert "meshlm_int8_matmul" in layers.lower(x, qs).as_text()
    _close(layers(jnp.asarray(x), jnp.asarray(qs)), want)
    donated = jax.jit(lambda h, w: quant.dot_rows(h, w, jnp.float32) / 500.0, donate_argnums=0)
    _close(donated(jnp.asarray(x), jnp.asarray(qs[0])), x.astype(np.float64) @ qs[0] / 500.0)


def test_inside_shard_map_on_8_devices():
    """Each device multiplies by its own column shard of q (rows: dot_rows) or row shard of the
    table (dot_t): per-device shapes reach the kernel."""
    mesh = jax.make_mesh((8,), ("x",))
    x, q = _case(5, 136, 8 * 40, seed=4)
    qt = np.ascontiguousarray(q.T)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    rows = jax.jit(jax.shard_map(lambda a, w: quant.dot_rows(a, w, jnp.float32), mesh=mesh,
                                 in_specs=(P(), P(None, "x")), out_specs=P(None, "x")))
    tied = jax.jit(jax.shard_map(lambda a, w: quant.dot_t(a, w, jnp.float32), mesh=mesh,
                                 in_specs=(P(), P("x", None)), out_specs=P(None, "x")))
    want = x.astype(np.float64) @ q
    xs = put(x, P())
    assert "meshlm_int8_matmul" in rows.lower(xs, put(q, P(None, "x"))).compile().as_text()
    _close(rows(xs, put(q, P(None, "x"))), want)
    _close(tied(xs, put(qt, P("x", None))), want)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


_PROBE = ("import jax.numpy as jnp, numpy as np\n"
          "from meshlm import kernels, quant\n"
          "x = jnp.ones((2, 300)); q = jnp.asarray(np.arange(300 * 7).reshape(300, 7) % 5, jnp.int8)\n"
          "y = np.asarray(quant.dot_rows(x, q, jnp.float32))\n"
          "assert np.array_equal(y, np.ones((2, 300)) @ np.asarray(q, np.float64)), y\n"
          "print(kernels.available(), quant.use_kernel(1), '|', kernels.reason())\n")


def test_meshlm_kernels_0_disables_the_kernel():
    out = _python(_PROBE, MESHLM_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False False |") and "MESHLM_KERNELS=0" in out.stdout


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    out = _python(_PROBE, CXX="meshlm-no-such-compiler", MESHLM_HOME=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False False |") and "meshlm-no-such-compiler" in out.stdout
    assert "Traceback" not in out.stderr and out.stderr.count("CPU kernels unavailable") == 1


def test_packed_crossover_follows_the_kernels_code_path():
    """AVX-512 kernels take packed int8 and f32 at any M; the AVX2 and portable paths hand both to
    XLA's GEMM above KERNEL_MAX_M_PACKED_AVX2 (measured: quant.py)."""
    big = quant.KERNEL_MAX_M_PACKED_AVX2 + 1
    if kernels.isa() == "avx512":
        assert quant.packed_kernel_max_m(True) == quant.packed_kernel_max_m(False) == float("inf")
        assert quant.use_kernel(16384, packed="f32") and quant.use_kernel(16384, packed="int8")
    else:
        assert quant.packed_kernel_max_m(True) == quant.packed_kernel_max_m(False) == quant.KERNEL_MAX_M_PACKED_AVX2
        assert not quant.use_kernel(big, packed="f32") and not quant.use_kernel(big, packed="int8")
