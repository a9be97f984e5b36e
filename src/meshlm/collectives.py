"""shard_map building blocks: the paper's collectives written from one device's point of view.

Axis groups are tuples of mesh axis names, major first (('y', 'z') splits a dimension y-major);
an empty tuple means "no collective" and every helper is then the identity, so layouts on meshes
with size-1 axes run exactly the collectives meshlm.comm lists.
"""

from __future__ import annotations

from jax import lax


def group_index(axes: tuple[str, ...]):
    """Linear index of this device within `axes` (row-major over the tuple)."""
    idx = 0
    for a in axes:
        idx = idx * lax.axis_size(a) + lax.axis_index(a)
    return idx


def group_size(axes: tuple[str, ...]) -> int:
    n = 1
    for a in axes:
        n *= lax.axis_size(a)
    return n


def all_gather(x, axes, axis: int):
    """Concatenate the shards of `axis` over the group (tiled): BLE_xyz -all_gather(yz)-> BLE_x."""
    return lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def reduce_scatter(x, axes, axis: int):
    """Sum partial sums over the group and keep this device's slice of `axis`."""
    return lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True) if axes else x


def psum(x, axes):
    return lax.psum(x, axes) if axes else x


def local_slice(x, axes, axis: int):
    """This device's block of a replicated x, split over `axes` along `axis` (no communication)."""
    if not axes:
        return x
    n = x.shape[axis] // group_size(axes)
    return lax.dynamic_slice_in_dim(x, group_index(axes) * n, n, axis)


def ring(axes):
    k = group_size(axes)
    return [(i, (i + 1) % k) for i in range(k)]


def ag_matmul(x, axes, chunk_matmul):
    """Looped collective matmul (§3.5) for all_gather(x over `axes`, last dim) followed by a matmul:
    returns sum_c chunk_matmul(x_c, c), where x_c is the c-th chunk of the gathered last dim.
    k-1 collective-permutes of one chunk each, each overlapping one chunk's matmul."""
    if not axes:
        return chunk_matmul(x, 0)
    k, i = group_size(axes), group_index(axes)
    acc = chunk_matmul(x, i)
    for s in range(1, k):
        x = lax.ppermute(x, axes, ring(axes))  # now holds the chunk of device i - s
        acc = acc + chunk_matmul(x, (i - s) % k)
    return acc


def matmul_rs(axes, chunk_matmul):
    """Looped collective matmul for a matmul followed by reduce_scatter(over `axes`): returns this
    device's chunk of sum_devices(partial), where chunk_matmul(c) is the local partial of output
    chunk c. Each step adds one chunk's partial to an accumulator passed around the ring."""
    if not axes:
        return chunk_matmul(0)
    k, i = group_size(axes), group_index(axes)
    acc = chunk_matmul((i - 1) % k)
    for s in range(1, k):
        acc = lax.ppermute(acc, axes, ring(axes))  # started at device i - s, for chunk i - s - 1
        acc = acc + chunk_matmul((i - s - 1) % k)
    return acc


def gather_blocks(x, axes, axis: int):
    """One all-gather over a multi-axis group, untiled: a new leading dim of group_size entries
    (major first), for callers that place the pieces on different dims (weight gathers)."""
    if not axes:
        return x[None]
    return lax.all_gather(x, axes, axis=0, tiled=False)


def all_to_all(x, axes, split_axis: int, concat_axis: int):
    return lax.all_to_all(x, axes, split_axis, concat_axis, tiled=True) if axes else x


def to_varying(x, axes):
    """Mark a value created inside shard_map as varying over `axes` (loop carries)."""
    return lax.pcast(x, axes, to="varying") if axes else x

