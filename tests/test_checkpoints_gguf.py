"""GGUF loading: a tiny Llama written the way llama.cpp writes it (permuted Q/K, BPE tokenizer,
chat template) must load back to the Hugging Face model's logits and tokenization."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp
from hf_models import llama_cpp_permute, make_hf_model, write_gguf
from meshlm import reference
from meshlm.checkpoints import Tokenizer, load_model
from meshlm.checkpoints.gguf_file import unpermute_rope
from meshlm.errors import MeshlmError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = make_hf_model("llama", d / "hf")
    tok = Tokenizer.from_hf_dir(d / "hf").tok
    write_gguf(hf, tok, d / "f32.gguf")
    write_gguf(hf, tok, d / "q8.gguf", quant="Q8_0")
    return hf, d


def test_unpermute_inverts_llama_cpp():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(w, 8), 8), w)
    assert not np.array_equal(llama_cpp_permute(w, 8), w)


def test_gguf_logits_match_transformers(models):
    hf, d = models
    m = load_model(d / "f32.gguf", progress=False)
    toks = np.random.RandomState(0).randint(3, 320, size=(2, 13))
    with torch.no_grad():
        want = hf(torch.tensor(toks)).logits.numpy()
    got = np.asarray(reference.forward(m.params, m.cfg, jnp.asarray(toks, jnp.int32)))
    assert np.abs(got - want).max() < 1e-4
    assert m.cfg.n_kv_heads == 2 and not m.cfg.tie_embeddings


def test_quantized_gguf_is_dequantized(models):
    hf, d = models
    m32 = load_model(d / "f32.gguf", progress=False)
    m8 = load_model(d / "q8.gguf", progress=False)
    a, b = np.asarray(m32.params["layers"]["wq"]), np.asarray(m8.params["layers"]["wq"])
    assert 0 < np.abs(a - b).max() < 0.02 * np.abs(a).max()  # Q8_0: ~1/127 relative per block


def test_gguf_tokenizer_matches_tokenizer_json(models):
    _, d = models
    hf_tok = Tokenizer.from_hf_dir(d / "hf")
    g = load_model(d / "f32.gguf", progress=False).tokenizer
    for text in ["The capital of France is Paris.", "héllo 東京 ✓ 1234", "  spaces\n\nand\tTabs"]:
        assert g.encode(text) == hf_tok.encode(text)
        assert g.decode(g.encode(text)) == text
    chat = g.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == hf_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = g.encode(chat, add_special=False)
    assert ids[0] == 1 and 2 in ids  # <|im_start|> and <|im_end|> are single special tokens
    assert g.eos_ids == (2,) and g.bos_id == 1


def test_truncated_gguf(models, tmp_path):
    _, d = models
    data = (d / "f32.gguf").read_bytes()
    for n in (len(data) // 2, 100):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(MeshlmError, match="corrupted GGUF"):
            load_model(p, progress=False)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "bert")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MeshlmError, match="architecture 'bert' is not supported"):
        load_model(tmp_path / "m.gguf", progress=False)


def test_qwen2_gguf_with_qkv_biases(tmp_path):
    """llama.cpp writes Qwen2 as arch 'qwen2': QKV biases, Q/K rows NOT permuted, tied embeddings."""
    hf = make_hf_model("qwen2", tmp_path / "hf")
    write_gguf(hf, Tokenizer.from_hf_dir(tmp_path / "hf").tok, tmp_path / "q.gguf")
    m = load_model(tmp_path / "q.gguf", progress=False)
    assert m.cfg.qkv_bias and m.cfg.tie_embeddings
    toks = np.random.RandomState(1).randint(3, 320, size=(1, 11))
    with torch.no_grad():
        want = hf(torch.tensor(toks)).logits.numpy()
    got = np.asarray(reference.forward(m.params, m.cfg, jnp.asarray(toks, jnp.int32)))
    assert np.abs(got - want).max() < 1e-4


def test_sentencepiece_vocabulary_from_gguf_metadata():
    """llama.cpp's 'llama' tokenizer (Llama 2, Mistral v0.1): pieces ranked by score, '▁' spaces,
    byte fallback for characters outside the vocabulary, BOS added."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "\u2581hello", "\u2581w", "or",
              "\u2581wor", "\u2581world", "ld", "\u2581he"]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            # "▁he" has the best score and merges first; ("▁he", "llo") must still reach "▁hello"
            "tokenizer.ggml.scores": [0.0] * 259 + [-50.0 if p == "\u2581he" else -float(100 - len(p)) for p in pieces],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    t = Tokenizer.from_gguf(meta)
    ids = t.encode("hello world 東")
    assert [toks[i] for i in ids] == ["<s>", "\u2581hello", "\u2581world", "\u2581", "<0xE6>", "<0x9D>", "<0xB1>"]
    assert t.decode(ids) == "hello world 東"
    assert t.encode("hello</s>")[-1] == 2 and t.eos_ids == (2,)
