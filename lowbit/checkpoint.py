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

from .errors import CheckpointError, ConfigError, LowbitError
from .names import to_canonical

ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# Bits per element of every dtype the safetensors format defines (a header naming another is corrupt).
ST_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "F64": 64, "I64": 64, "U64": 64,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REDOWNLOAD = "re-download or re-export the checkpoint"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F8_E4M3, U8, I32, ...
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint directory

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ST_BITS.get(self.dtype, 8) // 8


def _describe(path: Path) -> str:
    """The file's name, and where it points when it is a symlink."""
    if path.is_symlink():
        return f"{path} (a symlink to {os.readlink(path)})"
    return str(path)


def require_file(path: Path, what: str) -> Path:
    """`path` must be a readable regular file (a symlink to one is fine, as in the Hugging Face cache)."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError([f"{_describe(path)}: the symlink is dangling (its target does not exist), so the "
                               f"{what} cannot be read; {REDOWNLOAD} (a partly deleted Hugging Face cache "
                               f"leaves such links)"], header="checkpoint cannot be read")
    if not path.exists():
        raise CheckpointError([f"missing {what} {path}; {REDOWNLOAD}"], header="checkpoint cannot be read")
    if not path.is_file():
        raise CheckpointError([f"{_describe(path)}: the {what} is not a regular file; {REDOWNLOAD}"],
                              header="checkpoint cannot be read")
    return path


def _entry_problem(name: str, meta) -> str | None:
    """What is wrong with one header entry (dtype, shape, data_offsets), or None."""
    if not isinstance(meta, dict):
        return f"entry is {type(meta).__name__} {meta!r:.60}, not an object with dtype, shape and data_offsets"
    absent = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if absent:
        return f"entry has no {', '.join(absent)}"
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in ST_BITS:
        return f"unknown dtype {dtype!r} (safetensors dtypes: {', '.join(ST_BITS)})"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end"
    size = TensorInfo(name, dtype, tuple(shape), "").numel * ST_BITS[dtype]
    if size % 8 or offsets[1] - offsets[0] != size // 8:
        return (f"{dtype} {shape} needs {size / 8:g} bytes but data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]}")
    return None


def _layout_problems(header: dict, data_size: int) -> list[str]:
    """The byte ranges must tile the data section exactly, as safetensors requires: no overlap, no gap,
    nothing past the end (a truncated file) and nothing left over."""
    out = []
    ranges = sorted((m["data_offsets"][0], m["data_offsets"][1], n) for n, m in header.items())
    pos, prev = 0, None
    for begin, end, name in ranges:
        if begin < pos:
            out.append(f"tensor {name} (bytes {begin}-{end}) overlaps tensor {prev} (which ends at byte {pos}): "
                       f"the header is corrupt")
        elif begin > pos:
            out.append(f"{begin - pos} bytes before tensor {name} belong to no tensor: the header is corrupt")
        if end > data_size:
            out.append(f"tensor {name} ends at byte {end} of the data section, which holds only {data_size} "
                       f"bytes: the file is truncated (an interrupted download or copy?)")
        if end >= pos:
            pos, prev = end, name
    if pos < data_size and not any("truncated" in p for p in out):
        out.append(f"{data_size - pos} bytes after the last tensor belong to no tensor: the header is corrupt")
    return out


def read_safetensors_header(path: Path) -> dict:
    """name -> {dtype, shape, data_offsets} of one safetensors file, checked as strictly as safetensors
    itself checks on reading (so a file that passes here reads without error later)."""
    require_file(path, "safetensors file")
    where = _describe(path)
    fail = lambda *problems: CheckpointError([f"{where}: {p}" for p in problems],  # noqa: E731
                                             header=f"{path.name} is not a valid safetensors file")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise fail(f"only {len(raw)} bytes: not a safetensors file (truncated?); {REDOWNLOAD}")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise fail(f"header length {n} is implausible: not a safetensors file; {REDOWNLOAD}")
            if 8 + n > file_size:
                raise fail(f"the header needs {n} bytes but the file has {file_size - 8} after the length "
                           f"field: the file is truncated; {REDOWNLOAD}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"corrupt header ({e}); {REDOWNLOAD}") from None
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise fail(f"the header is a JSON {type(header).__name__}, not an object; {REDOWNLOAD}")
    meta = header.pop("__metadata__", None)
    problems = []
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        problems.append("__metadata__ must be an object of strings")
    for name, entry in header.items():
        bad = _entry_problem(name, entry)
        if bad:
            problems.append(f"tensor {name}: {bad}")
    if not problems:
        problems = _layout_problems(header, file_size - 8 - n)
    if problems:
        raise fail(*problems[:-1], f"{problems[-1]}; {REDOWNLOAD}")
    return header


def _load_json(path: Path, what: str = "config") -> dict:
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); fix or re-download the file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; fix or re-download the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}; fix or re-download "
                          f"the file")
    return data


def read_generation_config(folder: Path) -> dict:
    """generation_config.json ({} when absent), with the fields lowbit uses checked."""
    path = folder / "generation_config.json"
    if not path.exists() and not path.is_symlink():
        return {}
    gen = _load_json(path, "generation config")
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = gen.get(key)
        ok = v is None or type(v) is int and v >= 0 or (
            key == "eos_token_id" and isinstance(v, list) and all(type(x) is int and x >= 0 for x in v))
        if not ok:
            raise ConfigError(f"{path}: {key} must be a token id{' or a list of ids' if key == 'eos_token_id' else ''}"
                              f", found {v!r}; fix the file or delete it")
    return gen


def generation_eos_ids(folder: Path) -> list[int]:
    e = read_generation_config(folder).get("eos_token_id")
    return list(e) if isinstance(e, list) else [] if e is None else [e]


class Checkpoint:
    """A checkpoint directory: `config`, optional `hf_quant_config`, and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise LowbitError(f"no such checkpoint directory: {self.path}")
        if not self.path.is_dir():
            raise LowbitError(f"{self.path} is not a directory (expected a Hugging Face checkpoint folder)")
        cfg = self.path / "config.json"
        if not cfg.exists() and not cfg.is_symlink():
            raise ConfigError(f"{self.path}: no config.json, so this is not a Hugging Face checkpoint folder; give the "
                              f"folder that holds config.json and the *.safetensors files")
        self.config: dict = _load_json(cfg)
        hq = self.path / "hf_quant_config.json"
        self.hf_quant_config: dict | None = _load_json(hq) if hq.exists() or hq.is_symlink() else None
        self.generation_config: dict = read_generation_config(self.path)
        self._tensors: dict[str, TensorInfo] | None = None
        self._handles: dict[str, object] = {}

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo for every tensor of the model (headers are read and checked on first use)."""
        if self._tensors is None:
            self._tensors = self._index()
        return self._tensors

    # -- index
    def _shard_files(self) -> tuple[dict[str, list[str] | None], dict | None]:
        """file -> the tensor names the index assigns it (None without an index), and the weight map."""
        index = self.path / "model.safetensors.index.json"
        if index.exists() or index.is_symlink():
            weight_map = _load_json(index, "index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConfigError(f"{index}: no 'weight_map' object naming the file of every tensor; {REDOWNLOAD}")
            bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v.endswith(".safetensors")
                   or Path(v).name != v]
            if bad:
                k, v = bad[0]
                raise ConfigError(f"{index}: weight_map must map tensor names to .safetensors file names in this "
                                  f"folder; {k!r} maps to {v!r} ({len(bad)} such entries); {REDOWNLOAD}")
            files: dict[str, list[str] | None] = {}
            for name, fname in weight_map.items():
                files.setdefault(fname, []).append(name)
            missing = sorted(f for f in files if not (self.path / f).exists())
            if missing:
                raise CheckpointError(
                    [f"{index} names shard file(s) that do not exist: {', '.join(missing)} "
                     f"({sum(len(files[m]) for m in missing)} tensors, e.g. {files[missing[0]][0]}); {REDOWNLOAD}"],
                    header="checkpoint is incomplete")
            return files, weight_map
        # model.safetensors, or model-0000i-of-0000n.safetensors; other *.safetensors files in the
        # folder (e.g. reference outputs) are not part of the model
        if (self.path / "model.safetensors").exists() or (self.path / "model.safetensors").is_symlink():
            found = ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.path.glob("model-*-of-*.safetensors")) or \
                sorted(p.name for p in self.path.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise LowbitError(
                    f"{self.path}: holds only pickle checkpoint files ({', '.join(pickles[:3])}"
                    f"{', ...' if len(pickles) > 3 else ''}) and no *.safetensors; lowbit reads only safetensors "
                    f"(loading a pickle can run arbitrary code). Convert it, e.g. load it with transformers and "
                    f"save_pretrained(OUT, safe_serialization=True), or download the safetensors version")
            raise LowbitError(f"{self.path}: no *.safetensors files (only safetensors checkpoints are supported)")
        return {f: None for f in found}, None

    def _index(self) -> dict[str, TensorInfo]:
        files, weight_map = self._shard_files()
        out: dict[str, TensorInfo] = {}
        problems: list[str] = []
        for fname, expected in files.items():
            try:
                header = read_safetensors_header(self.path / fname)
            except CheckpointError as e:
                problems += e.problems
                continue
            if expected is not None:
                absent = sorted(set(expected) - set(header))
                if absent:
                    problems.append(f"{fname}: the index lists {absent[0]} (and {len(absent) - 1} more) in this "
                                    f"file, but the file does not hold it; {REDOWNLOAD}")
            for name, meta in header.items():
                if weight_map is not None and weight_map.get(name) != fname:
                    where = (f"it is also in {weight_map[name]}, the file the index names for it" if name in weight_map
                             else "the index does not list it, so it would be neither read nor reported")
                    problems.append(f"{fname}: holds tensor {name}, but {where}; {REDOWNLOAD} (or remove the "
                                    f"stray copy)")
                    continue
                if name in out:
                    problems.append(f"tensor {name} is stored twice, in {out[name].file} and {fname} (one copy "
                                    f"would silently win); remove one copy")
                    continue
                out[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), fname)
        spellings: dict[str, list[str]] = {}
        for name in out:
            spellings.setdefault(to_canonical(name), []).append(name)
        for canon, names in spellings.items():
            if len(names) > 1:
                problems.append(f"tensor {canon} is stored twice under different prefixes: "
                                f"{' and '.join(f'{n} ({out[n].file})' for n in names)}; one copy would silently "
                                f"win: remove the one that does not belong")
        if problems:
            raise CheckpointError(problems, header=f"{self.path}: the safetensors files cannot be read as one model")
        return out

    # -- data
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped, lazily opened file handles)."""
        from safetensors import safe_open

        info = self.tensors[name]
        try:
            h = self._handles.get(info.file)
            if h is None:
                h = safe_open(str(self.path / info.file), framework="pt", device="cpu")
                self._handles[info.file] = h
            return h.get_tensor(name)
        except Exception as e:  # safetensors' own errors (a file changed on disk, a dtype torch lacks)
            raise CheckpointError([f"{info.file}: tensor {name} ({info.dtype} {list(info.shape)}) cannot be read: "
                                   f"{str(e).splitlines()[0]}; {REDOWNLOAD}"], header="checkpoint cannot be read") from None

    def close(self):
        self._handles.clear()

    @property
    def text_config(self) -> dict:
        """The text model's config: `text_config` of a VLM wrapper, else the top level."""
        tc = self.config.get("text_config")
        return tc if isinstance(tc, dict) else self.config

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
