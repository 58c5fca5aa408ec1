"""Reading a Hugging Face checkpoint directory: configs, safetensors headers, lazy tensor reads.

Headers are parsed directly (8-byte length + JSON) so that `inspect` never touches tensor data;
tensor data is read through safetensors' memory-mapped `safe_open` only when the loader asks.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, LowbitError

ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F8_E4M3, U8, I32, ...
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint directory

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}.get(self.dtype, 1)
        return n * size


def read_safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LowbitError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise LowbitError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise LowbitError(f"missing safetensors file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


class Checkpoint:
    """A checkpoint directory: `config`, optional `hf_quant_config`, and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise LowbitError(f"no such checkpoint directory: {self.path}")
        if not self.path.is_dir():
            raise LowbitError(f"{self.path} is not a directory (expected a Hugging Face checkpoint folder)")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise ConfigError(f"{self.path}: no config.json (is this a Hugging Face checkpoint folder?)")
        self.config: dict = _load_json(cfg)
        hq = self.path / "hf_quant_config.json"
        self.hf_quant_config: dict | None = _load_json(hq) if hq.exists() else None
        self._tensors: dict[str, TensorInfo] | None = None
        self._handles: dict[str, object] = {}

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo for every tensor of the model (headers are read on first use)."""
        if self._tensors is None:
            self._tensors = self._index()
        return self._tensors

    # -- index
    def _index(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        files: dict[str, list[str] | None]
        if index.exists():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: no 'weight_map'")
            files = {}
            for name, fname in weight_map.items():
                files.setdefault(fname, []).append(name)
            missing = sorted(f for f in files if not (self.path / f).exists())
            if missing:
                raise LowbitError(
                    f"{index} names shard file(s) that do not exist: {', '.join(missing)} "
                    f"({sum(len(files[m]) for m in missing)} tensors); re-download the checkpoint"
                )
        else:
            # model.safetensors, or model-0000i-of-0000n.safetensors; other *.safetensors files in the
            # folder (e.g. reference outputs) are not part of the model
            if (self.path / "model.safetensors").exists():
                found = ["model.safetensors"]
            else:
                found = sorted(p.name for p in self.path.glob("model-*-of-*.safetensors")) or \
                    sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                raise LowbitError(f"{self.path}: no *.safetensors files (only safetensors checkpoints are supported)")
            files = {f: None for f in found}
        out: dict[str, TensorInfo] = {}
        for fname, expected in files.items():
            header = read_safetensors_header(self.path / fname)
            if expected is not None:
                absent = sorted(set(expected) - set(header))
                if absent:
                    raise LowbitError(f"{fname}: the index lists {absent[0]} (and {len(absent) - 1} more) but the file does not hold it")
            for name, meta in header.items():
                if expected is not None and name not in expected:
                    continue  # the index is the authority on which file holds a tensor
                out[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), fname)
        return out

    # -- data
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped, lazily opened file handles)."""
        from safetensors import safe_open

        info = self.tensors[name]
        h = self._handles.get(info.file)
        if h is None:
            h = safe_open(str(self.path / info.file), framework="pt", device="cpu")
            self._handles[info.file] = h
        return h.get_tensor(name)

    def close(self):
        self._handles.clear()

    @property
    def text_config(self) -> dict:
        """The text model's config: `text_config` of a VLM wrapper, else the top level."""
        tc = self.config.get("text_config")
        return tc if isinstance(tc, dict) else self.config

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
