"""Hugging Face checkpoint loading: sharded indexes, bf16, fused-QKV orders, and clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from hf_models import make_hf_model, save_tokenizer
from meshlm.checkpoints import leaf_shapes, load_model
from meshlm.checkpoints.hf import split_qkv
from meshlm.errors import MeshlmError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", d)
    return d


def _flat(params, prefix=""):
    out = {}
    for k, v in params.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
    return out


def test_every_leaf_present_with_config_shapes(llama_dir):
    m = load_model(llama_dir, progress=False)
    flat = _flat(m.params)
    assert {k: v.shape for k, v in flat.items()} == leaf_shapes(m.cfg)


def test_sharded_index_and_bf16_load_the_same_weights(llama_dir, tmp_path):
    hf = make_hf_model("llama", tmp_path / "x")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    save_tokenizer(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    save_tokenizer(tmp_path / "bf16")
    base = _flat(load_model(llama_dir, progress=False).params)
    sharded = _flat(load_model(tmp_path / "sharded", progress=False).params)
    bf16 = _flat(load_model(tmp_path / "bf16", progress=False).params)
    for k in base:
        np.testing.assert_array_equal(sharded[k], base[k])
        np.testing.assert_allclose(bf16[k], base[k], rtol=1e-2, atol=1e-2)
        assert not np.array_equal(bf16[k], base[k]) or base[k].size < 100  # really went through bf16


@pytest.mark.parametrize("order,H,K", [("per_head", 4, 4), ("mqa", 4, 1), ("grouped", 8, 2)])
def test_split_qkv_orders(order, H, K):
    """Label each fused row with (kind, head, d) as its architecture lays it out; the split must sort them."""
    D = 3
    if order == "per_head":
        rows = [(kind, h, d) for h in range(H) for kind in "qkv" for d in range(D)]
    elif order == "mqa":
        rows = [("q", h, d) for h in range(H) for d in range(D)] + [(k, 0, d) for k in "kv" for d in range(D)]
    else:
        G = H // K
        rows = [r for g in range(K) for r in [("q", g * G + j, d) for j in range(G) for d in range(D)]
                + [("k", g, d) for d in range(D)] + [("v", g, d) for d in range(D)]]
    code = {"q": 0, "k": 1, "v": 2}
    w = np.array([[code[k] * 1000 + h * 10 + d] for k, h, d in rows], np.float32)
    q, k, v = split_qkv(w, order, H, K, D)
    for arr, kind, n in [(q, "q", H), (k, "k", K), (v, "v", K)]:
        assert arr[:, 0].tolist() == [code[kind] * 1000 + h * 10 + d for h in range(n) for d in range(D)]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(tmp_path, llama_dir):
    with pytest.raises(MeshlmError, match="not found"):
        load_model(tmp_path / "nope")
    d = _copy(llama_dir, tmp_path / "no_config")
    (d / "config.json").unlink()
    with pytest.raises(MeshlmError, match="config.json"):
        load_model(d)
    d = _copy(llama_dir, tmp_path / "no_weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(MeshlmError, match="no \\*.safetensors"):
        load_model(d)
    d = _copy(llama_dir, tmp_path / "no_tok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(MeshlmError, match="tokenizer.json"):
        load_model(d)


def test_unknown_architecture(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "bert"}))
    with pytest.raises(MeshlmError, match="unsupported model_type 'bert'"):
        load_model(d)


def test_shape_mismatch(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "wide")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 100}))
    with pytest.raises(MeshlmError, match="mlp.gate_proj.weight has shape \\[96, 64\\].*\\[100, 64\\]"):
        load_model(d, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupted_safetensors(tmp_path, llama_dir, damage):
    d = _copy(llama_dir, tmp_path / damage)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(MeshlmError, match="corrupted safetensors"):
        load_model(d, progress=False)


def test_missing_shard(tmp_path, llama_dir):
    hf = make_hf_model("llama", tmp_path / "x")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    save_tokenizer(tmp_path / "sharded")
    victim = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MeshlmError, match="missing checkpoint shard"):
        load_model(tmp_path / "sharded")


def test_pickle_is_refused(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x80\x04")
    with pytest.raises(MeshlmError, match="pickle"):
        load_model(p)


def test_sharded_placer_gives_each_device_only_its_slice(llama_dir):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from meshlm.checkpoints import sharded_placer
    from meshlm.layouts import MeshShape
    from meshlm.mesh import make_mesh

    mesh = make_mesh(MeshShape(2, 2, 2))
    ref = _flat(load_model(llama_dir, progress=False).params)

    def spec(path):  # split the last axis over all 8 devices where it divides, else replicate
        return P(*([None] * (len(ref[path].shape) - 1)), ("x", "y", "z")) if ref[path].shape[-1] % 8 == 0 else P()
    m = load_model(llama_dir, placer_for=lambda cfg: sharded_placer({p: NamedSharding(mesh, spec(p)) for p in ref}),
                   progress=False)
    wq = m.params["layers"]["wq"]  # [Y, E, H, D] = [2, 64, 8, 8]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64, 8, 1)}
    assert len(wq.addressable_shards) == len(jax.devices()[:8])
    for path, a in _flat(m.params).items():
        np.testing.assert_array_equal(a, ref[path])


def test_eos_ids_from_tokenizer_config_and_generation_config(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path / "eos")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 100000]}))
    tok = load_model(d, progress=False).tokenizer
    assert tok.eos_ids == (2, 7)  # <|im_end|> from tokenizer_config.json, 7 added, out-of-vocab dropped
    assert tok.bos_id == 1 and tok.chat_template


def test_sliding_window_caps_the_context(tmp_path):
    make_hf_model("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"sliding_window": 48}))
    assert load_model(tmp_path, progress=False).cfg.max_seq_len == 48
