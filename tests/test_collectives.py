"""The looped collective matmuls equal the plain collective followed/preceded by the matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshlm.collectives import ag_matmul, gather_blocks, matmul_rs


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("x", "y", "z"))


@pytest.mark.parametrize("axes", [("y", "z"), ("x", "y", "z"), ("x",)])
def test_looped_matmuls_equal_plain(mesh, axes):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)  # [M, E] with E split over `axes`
    w = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)

    def looped(xl, w):
        k = xl.shape[1]
        y = ag_matmul(xl, axes, lambda xc, c: xc @ lax.dynamic_slice_in_dim(w, c * k, k, 0))
        n = 16 // np.prod([mesh.shape[a] for a in axes])
        return matmul_rs(axes, lambda c: y @ lax.dynamic_slice_in_dim(jnp.eye(16), c * n, n, 1))

    def plain(xl, w):
        y = lax.all_gather(xl, axes, axis=1, tiled=True) @ w
        return lax.psum_scatter(y, axes, scatter_dimension=1, tiled=True)

    spec = P(None, axes)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    run = [jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False))(xs, w)
           for f in (looped, plain)]
    k = np.prod([mesh.shape[a] for a in axes])
    np.testing.assert_allclose(np.asarray(run[0]), np.asarray(run[1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(run[1]), np.asarray(x @ w) * k, rtol=1e-5, atol=1e-4)


def test_gather_blocks_stacks_major_first(mesh):
    a = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(("x", "z", "y"))))
    f = jax.jit(jax.shard_map(lambda v: gather_blocks(v, ("x", "z", "y"), 0), mesh=mesh, in_specs=P(("x", "z", "y")),
                              out_specs=P(), check_vma=False))
    np.testing.assert_array_equal(np.asarray(f(a)).ravel(), np.arange(8.0))
