"""Damage operations on a copy of a checkpoint folder, for the fault corpus (tests/faults/kinds.py).

Each helper edits one thing in place: a tensor's data, dtype, shape or name (rewriting the safetensors
file), the raw header (keeping the data bytes as they are, so the header can lie), a JSON file, the
sharding, the tokenizer, or the files themselves (truncation, symlinks, pickle files).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAIN = "model.safetensors"


# -- tensors ----------------------------------------------------------------------------------------

def _file_of(path: Path, name: str) -> Path:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return path / json.loads(index.read_text())["weight_map"][name]
    return path / MAIN


def edit_tensors(path: Path, fn, file: str = MAIN) -> None:
    """fn(dict name -> tensor) edits the tensors of one file in place."""
    f = path / file
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def set_values(name: str, value: float, where=lambda t: (0,) * t.dim()):
    """Set one element (default the first) of a tensor to `value` (in its own dtype)."""
    def damage(path: Path):
        def fn(t):
            x = t[name].float() if t[name].dtype == torch.float8_e4m3fn else t[name].clone()
            if x.dim() == 0:
                x = torch.tensor(value, dtype=x.dtype)
            else:
                x[where(x)] = value
            t[name] = x.to(t[name].dtype)
        edit_tensors(path, fn, _file_of(path, name).name)
    return damage


def set_all(names, value: float):
    def damage(path: Path):
        for n in names:
            def fn(t, n=n):
                t[n] = torch.full_like(t[n].float(), value).to(t[n].dtype)
            edit_tensors(path, fn, _file_of(path, n).name)
    return damage


def drop(name: str):
    return lambda path: edit_tensors(path, lambda t: t.pop(name), _file_of(path, name).name)


def add(name: str, make):
    return lambda path: edit_tensors(path, lambda t: t.__setitem__(name, make()))


def copy_as(src: str, dst: str):
    """Store tensor `src` a second time, as `dst`."""
    return lambda path: edit_tensors(path, lambda t: t.__setitem__(dst, t[src].clone()))


def retype(name: str, dtype):
    return lambda path: edit_tensors(path, lambda t: t.__setitem__(name, t[name].float().to(dtype)
                                                                 if dtype.is_floating_point else t[name].to(dtype)))


def reshape(name: str, shape):
    def fn(t):
        x = t[name].reshape(-1).float()
        n = torch.Size(shape).numel()
        t[name] = x.repeat(n // max(1, x.numel()) + 1)[:n].reshape(shape).to(t[name].dtype)
    return lambda path: edit_tensors(path, fn)


def rename(src: str, dst: str):
    return lambda path: edit_tensors(path, lambda t: t.__setitem__(dst, t.pop(src)))


# -- raw safetensors bytes ------------------------------------------------------------------------------

def read_raw(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(f: Path, header, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def header(fn, file: str = MAIN):
    """fn(header dict) edits the JSON header; the data bytes stay as they were."""
    def damage(path: Path):
        h, data = read_raw(path / file)
        h = fn(h) or h
        write_raw(path / file, h, data)
    return damage


def entry(name: str, fn):
    """fn(entry dict) edits one tensor's header entry."""
    return header(lambda h: fn(h[name]))


def raw_bytes(fn, file: str = MAIN):
    """fn(bytes) -> bytes rewrites the whole file."""
    def damage(path: Path):
        f = path / file
        f.write_bytes(fn(f.read_bytes()))
    return damage


# -- JSON files -----------------------------------------------------------------------------------------

def json_edit(file: str, fn):
    def damage(path: Path):
        f = path / file
        d = json.loads(f.read_text())
        r = fn(d)
        d = r if r is not None else d
        f.write_text(json.dumps(d))
    return damage


def json_set(file: str, dotted: str, value):
    """Set d[a][b][c] = value for dotted 'a.b.c' (DELETE removes the key)."""
    def fn(d):
        *path, last = dotted.split(".")
        for k in path:
            d = d[k]
        if value is DELETE:
            d.pop(last, None)
        else:
            d[last] = value
    return json_edit(file, fn)


DELETE = object()


def config(dotted: str, value):
    return json_set("config.json", dotted, value)


def write_text(file: str, text: str):
    return lambda path: (path / file).write_text(text)


def remove(file: str):
    return lambda path: (path / file).unlink()


# -- sharding ---------------------------------------------------------------------------------------

def shard(n: int = 2, index: bool = True, edit=None):
    """Split model.safetensors into n files (with an index), then edit(shards: list[dict], weight_map)."""
    def damage(path: Path):
        t = load_file(path / MAIN)
        (path / MAIN).unlink()
        names = sorted(t)
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        parts = [{k: t[k] for k in names[i::n]} for i in range(n)]
        weight_map = {k: files[i] for i in range(n) for k in parts[i]}
        if edit:
            edit(parts, weight_map)
        for f, part in zip(files, parts):
            save_file(part, path / f, metadata={"format": "pt"})
        if index:
            (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return damage


# -- files ------------------------------------------------------------------------------------------

def symlink(file: str, target):
    """Replace `file` by a symlink to target(path) (a str/Path, possibly outside the folder or absent)."""
    def damage(path: Path):
        f = path / file
        if f.exists() or f.is_symlink():
            f.unlink()
        os.symlink(target(path), f)
    return damage


def pickle_only(name: str):
    def damage(path: Path):
        t = load_file(path / MAIN)
        torch.save(t, path / name)
        (path / MAIN).unlink()
    return damage


def tokenizer_ids_shifted(offset: int):
    """A tokenizer whose (non-special) token ids are all `offset` higher: past a small model's vocabulary."""
    def fn(d):
        d["model"]["vocab"] = {tok: i + offset if i > 2 else i for tok, i in d["model"]["vocab"].items()}
    return json_edit("tokenizer.json", fn)


def chain(*damages):
    def damage(path: Path):
        for d in damages:
            d(path)
    return damage
