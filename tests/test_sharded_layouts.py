"""Every FFN layout x attention layout x block type x phase on four 8-device meshes: outputs and
KV cache equal the unsharded reference, and the bytes of every collective kind in the compiled HLO
equal meshlm.comm's prediction exactly."""

import pytest

from meshlm.config import preset
from meshlm.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, MeshShape
from meshlm.sharded import ShardedModel
from sharded_cases import check_layout, reference_run

# tiny-palm: parallel block, MQA, LayerNorm; tiny-llama: serial block, GQA, RMSNorm
MODELS = ["tiny-palm", "tiny-llama"]
MESHES = ["2x2x2", "1x2x4", "4x2x1", "8x1x1"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_every_layout_equals_reference_and_moves_predicted_bytes(model, mesh):
    cfg = preset(model)
    m = MeshShape.parse(mesh)
    sm = ShardedModel(cfg, m)
    params = reference_run(cfg)[0]
    stored = {s: sm.shard_params(params, "f32", s) for s in ("1d", "2d")}
    errs = []
    for ffn in FFN_LAYOUTS:
        for attn in ATTN_LAYOUTS:
            errs += check_layout(sm, stored, Layout(ffn, attn, "f32", m))
    assert not errs, "\n".join(errs)
