"""Tokenizers (the `tokenizers` library) and chat templates (jinja2), from HF directories or GGUF.

HF: tokenizer.json (+ tokenizer_config.json for special tokens and the chat template, or
chat_template.jinja). GGUF: a byte-level BPE rebuilt from tokenizer.ggml.tokens/merges, with the
pre-tokenizer named by tokenizer.ggml.pre, and the template from tokenizer.chat_template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, normalizers, pre_tokenizers

from meshlm.errors import MeshlmError

# Pre-tokenizer regexes of the byte-level BPE families llama.cpp names in tokenizer.ggml.pre.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated")


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


_GGUF_PRE = {
    "default": lambda: [_split(_GPT2_SPLIT), _byte_level()],
    "gpt-2": lambda: [_split(_GPT2_SPLIT), _byte_level()],
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True), _split(_GPT2_SPLIT), _byte_level()],
    "llama-bpe": lambda: [_split(_LLAMA3_SPLIT), _byte_level()],
    "qwen2": lambda: [_split(_QWEN2_SPLIT), _byte_level()],
}


class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: Sequence[int],
                 chat_template: str | None, add_bos: bool, bos_token: str = "", eos_token: str = ""):
        self.tok = tok
        self.bos_id, self.eos_ids, self.add_bos = bos_id, tuple(dict.fromkeys(eos_ids)), add_bos
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids; add_special adds what tokenizer.json's post-processor adds (or BOS for GGUF)."""
        ids = self.tok.encode(text, add_special_tokens=add_special).ids
        if add_special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MeshlmError("this model has no chat template (tokenizer_config.json / GGUF tokenizer.chat_template)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise MeshlmError(f"chat template failed: {e}") from None

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: Path, extra_eos: Sequence[int] = ()) -> "Tokenizer":
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise MeshlmError(f"{directory} has no tokenizer.json (needed to turn text into tokens)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions for malformed files
            raise MeshlmError(f"cannot read {path}: {e}") from None
        tc = _read_json(directory / "tokenizer_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = directory / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        eos_ids = [i for i in [tok.token_to_id(eos) if eos else None, *extra_eos] if i is not None]
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, chat_template=template, add_bos=False,
                   bos_token=bos or "", eos_token=eos or "")

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if "tokenizer.ggml.tokens" not in meta:
            raise MeshlmError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "llama":
            tok = _sentencepiece_bpe(meta, tokens, types)
        elif kind == "gpt2":
            if pre not in _GGUF_PRE:
                raise MeshlmError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(_GGUF_PRE)}")
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
            tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                                  ignore_merges=pre == "llama-bpe"))
            tok.pre_tokenizer = pre_tokenizers.Sequence(_GGUF_PRE[pre]())
            tok.decoder = decoders.ByteLevel()
        else:
            raise MeshlmError(f"GGUF tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' or "
                              f"SentencePiece BPE 'llama')")
        # control (3) and user-defined (4) tokens are matched whole, before BPE; control ones are special
        tok.add_tokens([tokenizers.AddedToken(tokens[i], special=t == 3, normalized=False)
                        for i, t in enumerate(types) if t in (3, 4)])
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, chat_template=meta.get("tokenizer.chat_template"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   bos_token=tokens[bos_id] if bos_id is not None else "",
                   eos_token=tokens[eos_ids[0]] if eos_ids else "")


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """llama.cpp's 'llama' vocabulary (SentencePiece BPE: pieces with scores, '▁' for spaces, byte
    fallback) as a `tokenizers` BPE. Merges are every split of a normal piece into two pieces,
    ranked by the merged piece's score, as transformers' SentencePiece converter derives them."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for t, i in vocab.items():
        if types[i] != 1:
            continue
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges += [(a, b, scores[i]) for a, b in local]
    merges.sort(key=lambda m: -m[2])  # stable: ties keep the order above
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=tokens[unk],
                                          fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix", True)
                                       else []))
    return tok


def _raise(message: str):
    raise TemplateError(message)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MeshlmError(f"cannot read {path}: {e}") from None
    return d if isinstance(d, dict) else {}


def _token_text(t: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(t, dict):
        return t.get("content")
    return t if isinstance(t, str) else None
