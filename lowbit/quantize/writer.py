"""Writing the output folder: safetensors shards with an index, the configs, the tokenizer files.

Tensors are buffered only until a shard is full, then written, so memory holds at most one shard
of output. Shards are named model-0000i-of-0000n.safetensors once n is known, and
model.safetensors.index.json maps every tensor to its shard (as transformers writes them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import LowbitError

INDEX_NAME = "model.safetensors.index.json"
# Files of the source folder that travel with the weights unchanged.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "preprocessor_config.json", "processor_config.json")
# What a previous `lowbit quantize` may have left in OUT; --force removes exactly these.
OUTPUT_GLOBS = ("*.safetensors", INDEX_NAME, "config.json", "hf_quant_config.json") + SIDE_FILES
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes (GB = 10^9, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise LowbitError(f"invalid shard size {text!r}; expected e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def prepare_output(out: Path, src: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty OUT unless --force; with --force remove only what a
    quantize run writes. OUT may not be SRC (the source would be destroyed while being read)."""
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output {out} exists and is not a directory; choose a new folder")
    if out.resolve() == src.resolve():
        raise LowbitError(f"output {out} is the source folder; choose a new folder for the quantized checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in out.iterdir())
    if present and not force:
        listed = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise LowbitError(f"output folder {out} is not empty ({listed}); pass --force to overwrite it "
                          f"or choose a new folder")
    for pattern in OUTPUT_GLOBS:
        for p in out.glob(pattern):
            p.unlink()


def copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def write_json(path: Path, data: dict, indent: int = 2, sort_keys: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")


class ShardedWriter:
    """Collects named tensors and writes them as size-limited safetensors shards plus an index."""

    def __init__(self, out: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out = Path(out)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._storages: set[int] = set()
        self._parts: list[tuple[Path, list[str]]] = []  # written shard (temporary name), its tensors
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._parts):
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (one scale used by several shards) or views
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffered + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._storages.add(t.untyped_storage().data_ptr())
        self._buffered += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".partial-{len(self._parts) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._parts.append((path, list(self._buffer)))
        self._buffer, self._buffered, self._storages = {}, 0, set()

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index; returns the names."""
        if self._buffer or not self._parts:
            self._flush()
        n = len(self._parts)
        weight_map, names = {}, []
        for i, (tmp, tensors) in enumerate(self._parts, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = self.out / INDEX_NAME
        write_json(index, {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        # safetensors creates files private (0600); give shards the permissions of any other new file
        for name in names:
            os.chmod(self.out / name, index.stat().st_mode & 0o777)
        return names
