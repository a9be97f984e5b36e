"""Read Hugging Face safetensors checkpoints (single file or sharded index) without torch or pickle.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian data. We parse it ourselves (memory-mapped) so that every
way a file can be broken (truncated, bad header, offsets past the end) becomes one clear
`MeshlmError`, and so bf16 needs no torch.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from meshlm.errors import MeshlmError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: `names`, `shape(name)`, `get(name)` (a numpy view, no copy)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                if size < 8:
                    raise MeshlmError(f"corrupted safetensors file {path}: only {size} bytes")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, _MAX_HEADER):
                    raise MeshlmError(f"corrupted safetensors file {path}: header length {n} exceeds the file")
                header = json.loads(f.read(n))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
        except OSError as e:
            raise MeshlmError(f"cannot read {path}: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MeshlmError(f"corrupted safetensors file {path}: bad header ({e})") from None
        if not isinstance(header, dict):
            raise MeshlmError(f"corrupted safetensors file {path}: header is not a JSON object")
        header.pop("__metadata__", None)
        self._start = 8 + n
        data_len = size - self._start
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MeshlmError(f"corrupted safetensors file {path}: bad entry for tensor {name!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes or begin < 0:
                raise MeshlmError(f"corrupted safetensors file {path}: tensor {name!r} has {end - begin} bytes, "
                                  f"its shape {list(shape)} needs {nbytes}")
            if end > data_len:
                raise MeshlmError(f"corrupted safetensors file {path}: tensor {name!r} ends past the end of "
                                  f"the file (truncated?)")
            self._info[name] = (np.dtype(dtype), shape, begin, end)

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._info[name]
        buf = np.frombuffer(self._map, dtype=np.uint8, count=end - begin, offset=self._start + begin) \
            if end > begin else np.zeros(0, np.uint8)
        return buf.view(dtype).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json lists (each opened lazily, once)."""

    def __init__(self, directory: Path):
        self.dir = directory
        index = directory / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {str(k): str(v) for k, v in weight_map.items()}
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise MeshlmError(f"corrupted index {index}: {e}") from None
            for fname in sorted(set(self._where.values())):
                if not (directory / fname).is_file():
                    raise MeshlmError(f"missing checkpoint shard {directory / fname} (listed in {index.name})")
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise MeshlmError(f"no *.safetensors weights in {directory} (pickle .bin checkpoints are not "
                                  f"loaded, for safety; convert them to safetensors)")
            self._where = {}
            for p in files:
                for name in self._open(p.name).names:
                    self._where[name] = p.name

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise MeshlmError(f"checkpoint {self.dir} lacks the tensor {name!r}")
        f = self._open(self._where[name])
        if name not in f.names:
            raise MeshlmError(f"checkpoint shard {f.path} lacks the tensor {name!r} that the index lists")
        return f.get(name)
