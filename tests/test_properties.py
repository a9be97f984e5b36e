"""Property tests (hypothesis) of the pure-Python core: sharding notation, mesh shapes, head
padding, and the collective inventory against the paper's closed forms for arbitrary shapes."""

from hypothesis import given, settings, strategies as st

from meshlm import comm
from meshlm.config import ModelConfig
from meshlm.layouts import Layout, MeshShape, parse_spec, shard_elems, spec_axes

axes_groups = st.sampled_from(["", "x", "y", "z", "xy", "yz", "xz", "xyz"])
pow2 = st.sampled_from([1, 2, 4, 8])
meshes = st.builds(MeshShape, pow2, pow2, pow2)


@given(st.lists(st.tuples(st.sampled_from("BLEFHKDV"), axes_groups), min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_spec_round_trip(dims):
    # no mesh axis may appear twice in one spec
    used = "".join(a for _, a in dims)
    if len(set(used)) != len(used):
        return
    text = " ".join(d + (f"_{a}" if a else "") for d, a in dims)
    assert parse_spec(text) == dims
    assert spec_axes(text) == tuple(tuple(a) if a else None for _, a in dims)


@given(meshes, st.integers(1, 64), st.integers(1, 64))
def test_shard_elems_is_global_over_shards(mesh, b, e):
    dims = {"B": b * mesh.x, "L": 3, "E": e * mesh.y * mesh.z}
    # every mesh axis appears once: each device holds exactly 1/n of the tensor
    assert shard_elems("B_x L E_yz", dims, mesh) * mesh.n == dims["B"] * dims["L"] * dims["E"]
    # a replicated axis (y missing) keeps Y times more per device
    assert shard_elems("B_x L E_z", dims, mesh) * mesh.n == dims["B"] * dims["L"] * dims["E"] * mesh.y


@given(st.integers(1, 96))
def test_all_mesh_shapes_multiply_to_n(n):
    shapes = MeshShape.all_for(n)
    assert shapes and all(m.n == n for m in shapes)
    assert len(set(shapes)) == len(shapes)


@settings(max_examples=200)
@given(st.integers(1, 16), st.integers(1, 8), meshes)
def test_served_heads_hold_whole_groups_per_device(k, g, mesh):
    """Padded heads split over all n devices; every device's query heads belong to KV heads it holds."""
    cfg = ModelConfig(name="p", n_layers=1, d_model=64, d_ff=64, n_heads=k * g, n_kv_heads=k, d_head=8, vocab=8)
    Hs, Ks = comm.served_heads(cfg, mesh)
    n = mesh.n
    assert Hs >= cfg.n_heads and Ks >= k and Hs % Ks == 0 and Hs // Ks >= g
    assert Hs % n == 0
    assert Ks % n == 0 or n % Ks == 0
    if n % Ks == 0:  # each KV head is shared by n/Ks devices, each holding whole query heads of it
        assert (Hs // Ks) % (n // Ks) == 0


@settings(max_examples=100)
@given(st.sampled_from([2, 4]), st.sampled_from([2, 4]), st.sampled_from([2, 4]),
       st.sampled_from([256, 512, 1024]), st.sampled_from([1, 2, 4]), st.integers(1, 64))
def test_ffn_bytes_follow_the_paper_formulas(X, Y, Z, E, r, bl):
    """App. A.2: ws2d moves 2BL(E/X + F/YZ); wg with N chips gathering moves 2EF N/n + 2BLE/N."""
    m, F = MeshShape(X, Y, Z), r * E
    n = m.n
    tokens = bl * n  # a batch every layout can split without padding
    cfg = ModelConfig(name="f", n_layers=1, d_model=E, d_ff=F, n_heads=n, n_kv_heads=n, d_head=8, vocab=n,
                      block="serial", gated_mlp=False, activation="gelu")

    def ffn_elems(ffn):
        cs = comm.forward_collectives(cfg, Layout(ffn, "heads", "bf16", m), "decode", tokens, 1, 1, act_bytes=1)
        return sum(c.bytes * c.count for c in cs if c.what.startswith("ffn.") and "norm_stats" not in c.what)

    w = 2  # bf16 weights: bytes per element in the weight gathers
    assert ffn_elems("ws2d") == 2 * tokens * (E / X + F / (Y * Z))
    for ffn, N in (("wg-x", X), ("wg-xy", X * Y), ("wg-xyz", n)):
        acts = 2 * tokens * E / N if N < n else 0
        assert ffn_elems(ffn) == 2 * E * F * N / n * w + acts


@settings(max_examples=50)
@given(meshes, st.sampled_from(["ws2d", "wg-x", "wg-xy", "wg-xyz"]), st.sampled_from(["heads", "batch"]),
       st.integers(1, 4))
def test_comm_is_linear_in_padded_batch(mesh, ffn, attn, k):
    """Per-device bytes scale with the padded batch: the planner's batch interpolation relies on it."""
    from meshlm.config import preset

    cfg = preset("tiny-palm")
    lay = Layout(ffn, attn, "f32", mesh)
    b = comm.batch_multiple(lay)

    def acts(batch):
        return sum(c.bytes * c.count for c in comm.forward_collectives(cfg, lay, "prefill", batch, 4, 4, 4)
                   if ".gather" not in c.what or "w_" not in c.what)

    base = acts(b) - (acts(2 * b) - acts(b))  # the batch-independent part (weight gathers)
    assert abs(acts(k * b) - (base + k * (acts(b) - base))) < 1e-6 * max(acts(k * b), 1)

