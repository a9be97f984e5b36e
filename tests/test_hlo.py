"""meshlm.hlo on programs whose collectives are known by construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshlm import hlo


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("x", "y", "z"))


def test_counts_bytes_and_loop_trip_counts(mesh):
    def body(a):  # a: local f32[4, 8]
        g = lax.all_gather(a, ("y", "z"), axis=1, tiled=True)  # out [4, 32] = 512 B
        r = lax.psum_scatter(g, "x", scatter_dimension=1, tiled=True)  # in [4, 32] = 512 B
        s = lax.psum(r, "x")  # [4, 16] = 256 B
        t = lax.all_to_all(s, ("x", "y", "z"), 1, 0, tiled=True)  # 256 B

        def step(c, _):
            c = lax.ppermute(c, "z", [(0, 1), (1, 0)])  # 256 B, 3 times per outer step
            c = lax.fori_loop(0, 3, lambda i, v: lax.ppermute(v, "y", [(0, 1), (1, 0)]), c)
            return c, None

        u, _ = lax.scan(step, t, None, length=5)
        return u

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(None, ("x", "y", "z")), out_specs=P(None, ("x", "y", "z")),
                              check_vma=False))
    a = jax.device_put(jnp.ones((4, 64)), NamedSharding(mesh, P(None, ("x", "y", "z"))))
    text = f.lower(a).compile().as_text()
    t = hlo.totals(text)
    assert t == {"all-gather": 512, "reduce-scatter": 512, "all-reduce": 256, "all-to-all": 256,
                 "collective-permute": 256 * (5 + 5 * 3)}
    c = hlo.counts(text)
    assert c["collective-permute"] == 20 and c["all-gather"] == 1


def test_iota_replica_groups_and_missing_trip_count():
    text = """HloModule m
ENTRY %main (p: f32[8]) -> f32[32] {
  %p = f32[8]{0} parameter(0)
  ROOT %ag = f32[32]{0} all-gather(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
}
"""
    (op,) = hlo.parse(text)
    assert op.group == 4 and op.bytes == 128 and op.times == 1
    bad = text.replace("ROOT %ag", "%w = (s32[]) while(%t), condition=%c, body=%b\n  ROOT %ag")
    with pytest.raises(ValueError, match="known_trip_count"):
        hlo.parse(bad)
