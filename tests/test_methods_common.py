"""Behaviour every quantized scheme unit shares, tested for every scheme of spec section 2:
fused shards with different scales are lossless, fused-on-disk tensors fill every slot, tensor
parallelism splits exactly, unwritten slots and malformed tensors are refused, and no
full-precision copy of a weight is kept.

The scheme catalog and `make_disk` (random, valid on-disk tensors written with lowbit's numerics,
as the producers lay them out) are shared by the per-family test files.
"""
from __future__ import annotations

from math import ceil

import pytest
import torch

from lowbit.checkpoint import TORCH_TO_ST
from lowbit.errors import CheckpointError, ConfigError
from lowbit.quant.base import LinearSpec, QLinear, RunOptions
from lowbit.quant.formats import check_tensor
from lowbit.quant.methods import method_class
from lowbit.quant.numerics import pack_int32
from lowbit.quant.scheme import Scheme

MO, CT = "modelopt", "compressed-tensors"
NVFP4 = dict(weight="nvfp4", granularity="group", group_size=16)
SCHEMES = {  # docs/schemes.md
    "modelopt-fp8": Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor", fmt=MO),
    "modelopt-fp8-channel-token": Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                                         act_granularity="token", fmt=MO),
    "modelopt-fp8-pb-wo": Scheme(weight="fp8", granularity="block", block=(128, 128), fmt=MO),
    "modelopt-nvfp4": Scheme(**NVFP4, activation="nvfp4", act_granularity="group", fmt=MO),
    "modelopt-w4a16-nvfp4": Scheme(**NVFP4, fmt=MO),
    "ct-nvfp4": Scheme(**NVFP4, activation="nvfp4", act_granularity="group", fmt=CT),
    "ct-nvfp4a16": Scheme(**NVFP4, fmt=CT),
    "ct-w4a16-g32": Scheme(weight="int4", granularity="group", group_size=32, packed=True, fmt=CT),
    "ct-w4a16-g32-asym": Scheme(weight="int4", granularity="group", group_size=32, symmetric=False, packed=True,
                                fmt=CT),
    "ct-w4a16-channel-asym": Scheme(weight="int4", granularity="channel", symmetric=False, packed=True, fmt=CT),
    "ct-w8a16-channel": Scheme(weight="int8", granularity="channel", packed=True, fmt=CT),
    "ct-w8a16-g32-asym": Scheme(weight="int8", granularity="group", group_size=32, symmetric=False, packed=True,
                                fmt=CT),
    "ct-w8a8-dynamic": Scheme(weight="int8", granularity="channel", activation="int8", act_dynamic=True,
                              act_granularity="token", fmt=CT),
    "ct-w8a8-static-asym": Scheme(weight="int8", granularity="tensor", activation="int8", act_granularity="tensor",
                                  act_symmetric=False, fmt=CT),
    "ct-fp8-tensor-static": Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor",
                                   fmt=CT),
    "ct-fp8-dynamic": Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                             act_granularity="token", fmt=CT),
    "ct-fp8-block": Scheme(weight="fp8", granularity="block", block=(128, 128), activation="fp8", act_dynamic=True,
                           act_granularity="group", fmt=CT),
    "ct-fp8-w8a16": Scheme(weight="fp8", granularity="channel", fmt=CT),
}
ACT_ROLES = ("input_scale", "input_global_scale", "input_zero_point")


def shapes(scheme: Scheme) -> tuple[tuple[int, int, int], int]:
    """Fused shard sizes and K for the generic tests (K is not a multiple of 128 for blocks)."""
    return ((256, 128, 128), 320) if scheme.granularity == "block" else ((96, 32, 32), 192)


def pos(*shape, lo=0.25, hi=4.0) -> torch.Tensor:
    """Random positive values (scales are never zero)."""
    return lo + (hi - lo) * torch.rand(*shape)


def random_fp8(*shape) -> torch.Tensor:
    """Every E4M3 code is possible except NaN (0x7F / 0xFF)."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)
    return b.view(torch.float8_e4m3fn)


def _per_tensor(fmt, value, dtype=torch.float32):
    """ModelOpt writes per-tensor values 0-d, compressed-tensors as [1]."""
    return value.reshape(()) if fmt == MO else value.reshape(1).to(dtype)


def make_disk(scheme: Scheme, n: int, k: int) -> dict[str, torch.Tensor]:
    """On-disk tensors of one module [n, k] of `scheme` with fresh random data and scales."""
    fmt, s = scheme.fmt, scheme
    t: dict[str, torch.Tensor] = {}
    if s.weight == "fp8":
        t["weight"] = random_fp8(n, k)
        if s.granularity == "tensor":
            t["weight_scale"] = _per_tensor(fmt, pos(1) * 1e-3, torch.bfloat16)
        elif s.granularity == "channel":
            t["weight_scale"] = pos(n) * 1e-3 if fmt == MO else (pos(n, 1) * 1e-3).bfloat16()
        else:
            nb, kb = ceil(n / s.block[0]), ceil(k / s.block[1])
            t["weight_scale"] = pos(nb, 1, kb, 1) * 1e-3 if fmt == MO else (pos(nb, kb) * 1e-3).bfloat16()
        if s.activation == "fp8" and not s.act_dynamic:
            t["input_scale"] = _per_tensor(fmt, pos(1) * 1e-2, torch.bfloat16)
    elif s.weight == "nvfp4":
        t["weight" if fmt == MO else "weight_packed"] = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        t["weight_scale"] = (pos(n, ceil(k / 16), lo=0.01, hi=400.0)).to(torch.float8_e4m3fn)
        if fmt == MO:
            t["weight_scale_2"] = (pos(1) * 1e-4).reshape(())
        else:  # a divisor, rounded to bf16 precision as llm-compressor writes it
            t["weight_global_scale"] = (pos(1) * 1e4).bfloat16().float()
        if s.activation == "nvfp4":
            if fmt == MO:
                t["input_scale"] = (pos(1) * 1e-3).reshape(())
            else:
                t["input_global_scale"] = (pos(1) * 1e3).bfloat16().float()
    elif s.packed:
        bits = 4 if s.weight == "int4" else 8
        groups = ceil(k / s.group_size) if s.granularity == "group" else 1
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=torch.int8)
        t["weight_packed"] = pack_int32(q, bits)
        t["weight_scale"] = (pos(n, groups) * 1e-2).bfloat16()
        t["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not s.symmetric:
            zp = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, groups), dtype=torch.int8)
            t["weight_zero_point"] = pack_int32(zp, bits, dim=0)
    else:  # int8 int-quantized
        t["weight"] = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scale = pos(1) if s.granularity == "tensor" else pos(n, 1)
        t["weight_scale"] = (scale * 1e-3).bfloat16()
        if not s.act_dynamic:
            t["input_scale"] = (pos(1) * 1e-2).bfloat16()
            if not s.act_symmetric:
                t["input_zero_point"] = torch.randint(-20, 20, (1,), dtype=torch.int8)
    return t


def build(scheme, sizes, k, dtype=torch.float32, bias=False, parallel=None, tp_rank=0, tp_size=1, **options):
    spec = LinearSpec("model.layers.0.test_proj", k, tuple(sizes), bias, parallel, tp_rank, tp_size)
    return QLinear(method_class(scheme)(scheme, spec, dtype, RunOptions(**options)))


def load(layer, shards: dict[int | None, dict[str, torch.Tensor]]) -> list[str]:
    """Feed on-disk tensors (per shard, None = fused on disk) and finalize; returns the notes."""
    notes = []
    for shard, tensors in shards.items():
        for role, t in tensors.items():
            note = layer.method.load(layer, role, t, shard)
            notes += [note] if note else []
    return notes + layer.method.finalize(layer)


def share_act_scales(disks: list[dict]) -> None:
    """Fused shards quantize one input: give them shard 0's activation scale, as producers do."""
    for d in disks[1:]:
        d.update({r: v for r, v in disks[0].items() if r in ACT_ROLES})


def deq(layer) -> torch.Tensor:
    return layer.method.dequantize(layer)


def assert_fp32_close(a, b):
    """Equal up to fp32 rounding (the GEMM may sum in a different order)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


ALL = sorted(SCHEMES)


@pytest.mark.parametrize("name", ALL)
def test_fused_equals_unfused_with_different_shard_scales(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    disks = [make_disk(scheme, n, k) for n in sizes]
    share_act_scales(disks)
    fused = build(scheme, sizes, k, activation_quant="emulate")
    load(fused, dict(enumerate(disks)))
    parts = [build(scheme, (n,), k, activation_quant="emulate") for n in sizes]
    for p, d in zip(parts, disks):
        load(p, {None: d})
    assert torch.equal(deq(fused), torch.cat([deq(p) for p in parts]))
    x = torch.randn(5, k)
    assert_fp32_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))


@pytest.mark.parametrize("name", ALL)
def test_fused_on_disk_fills_every_slot(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    disk = make_disk(scheme, sum(sizes), k)  # Phi-3 style: one tensor, one set of scales, all rows
    fused = build(scheme, sizes, k)
    load(fused, {None: disk})
    whole = build(scheme, (sum(sizes),), k)
    load(whole, {None: disk})
    assert torch.equal(deq(fused), deq(whole))
    x = torch.randn(3, k)
    assert_fp32_close(fused(x), whole(x))


def _rank_rows(deqs, sizes, tp):
    """Reassemble column-parallel ranks ([q_r; k_r; v_r] each) into the tp=1 row order."""
    out = []
    for i, n in enumerate(sizes):
        start = sum(sizes[:i]) // tp
        out += [d[start:start + n // tp] for d in deqs]
    return torch.cat(out)


@pytest.mark.parametrize("name", ALL)
def test_tensor_parallel_column_and_row_split_exactly(name):
    scheme = SCHEMES[name]
    block = scheme.granularity == "block"
    sizes, k = ((256, 256, 256), 512) if block else ((96, 32, 32), 192)
    disks = [make_disk(scheme, n, k) for n in sizes]
    share_act_scales(disks)
    full = build(scheme, sizes, k)
    load(full, dict(enumerate(disks)))
    ranks = [build(scheme, sizes, k, parallel="column", tp_rank=r, tp_size=2) for r in range(2)]
    for r in ranks:
        load(r, dict(enumerate(disks)))
    assert torch.equal(_rank_rows([deq(r) for r in ranks], sizes, 2), deq(full))

    n = sizes[0]
    disk = make_disk(scheme, n, k)
    disk["bias"] = torch.randn(n)
    full = build(scheme, (n,), k, bias=True, activation_quant="weight-only")
    load(full, {None: disk})
    ranks = [build(scheme, (n,), k, bias=True, parallel="row", tp_rank=r, tp_size=2, activation_quant="weight-only")
             for r in range(2)]
    for r in ranks:
        load(r, {None: disk})
    assert torch.equal(torch.cat([deq(r) for r in ranks], dim=1), deq(full))
    x = torch.randn(4, k)
    partial = sum(r(x[:, i * k // 2:(i + 1) * k // 2]) for i, r in enumerate(ranks))  # the all-reduce
    assert_fp32_close(partial, full(x))


def _scale_roles(disk):
    return [r for r, t in disk.items() if t.is_floating_point() and r not in ("weight", "weight_packed")]


@pytest.mark.parametrize("name", ALL)
def test_unwritten_scale_slot_is_a_load_error(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    disks = [make_disk(scheme, n, k) for n in sizes]
    for role in _scale_roles(disks[0]):
        layer = build(scheme, sizes, k)
        partial = [dict(d) for d in disks]
        del partial[1][role]
        with pytest.raises(CheckpointError, match="test_proj"):
            load(layer, dict(enumerate(partial)))


@pytest.mark.parametrize("name", ALL)
def test_malformed_tensors_are_refused_with_the_tensor_named(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    disk = make_disk(scheme, sizes[0], k)
    payload = "weight_packed" if "weight_packed" in disk else "weight"
    wrong_dtype = {torch.uint8: torch.int8, torch.int8: torch.uint8, torch.int32: torch.int64,
                   torch.float8_e4m3fn: torch.bfloat16}[disk[payload].dtype]
    layer = build(scheme, sizes, k)
    with pytest.raises(CheckpointError, match=rf"test_proj \(shard 0 of 3\) {payload}: expected dtype"):
        layer.method.load(layer, payload, disk[payload].to(wrong_dtype), 0)
    with pytest.raises(CheckpointError, match=rf"{payload}: shape"):
        layer.method.load(layer, payload, disk[payload][:, :-1], 0)
    scale = disk["weight_scale"]
    wrong = torch.cat([scale, scale]) if scale.dim() else scale.expand(2)
    with pytest.raises(CheckpointError, match="weight_scale"):
        layer.method.load(layer, "weight_scale", wrong, 0)
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        layer.method.load(layer, "weight_g_idx", disk[payload], 0)


@pytest.mark.parametrize("name", ALL)
def test_disk_tensors_is_the_formats_table_and_makers_fit_it(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    layer = build(scheme, sizes, k)
    expected = layer.method.disk_tensors(sizes[0], k)
    disk = make_disk(scheme, sizes[0], k)
    for role, t in disk.items():
        assert check_tensor(expected[role], TORCH_TO_ST[t.dtype], tuple(t.shape)) is None, role
    assert {r for r, s in expected.items() if not s.optional} <= set(disk)


@pytest.mark.parametrize("name", ALL)
def test_no_full_precision_copy_of_the_weight(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    layer = build(scheme, sizes, k, dtype=torch.bfloat16)
    load(layer, dict(enumerate(make_disk(scheme, n, k) for n in sizes)))
    before = {n: p.data_ptr() for n, p in layer.named_parameters()}
    layer(torch.randn(2, k, dtype=torch.bfloat16))
    after = {n: p.data_ptr() for n, p in layer.named_parameters()}
    assert before == after and not list(layer.buffers())
    n_elems = sum(sizes) * k
    # the payload plus at most 1 bit per element of group scales / zero points and 8 bytes per row
    assert layer.method.weight_bytes(layer) <= n_elems * (scheme.bits + 1) / 8 + 8 * sum(sizes)


@pytest.mark.parametrize("name", ["ct-nvfp4", "ct-w4a16-g32-asym", "modelopt-fp8"])
def test_tensor_parallel_sizes_that_do_not_divide_are_refused(name):
    with pytest.raises(ConfigError, match="rows of a shard is 33, not a multiple of 2"):
        build(SCHEMES[name], (64, 33), 192, parallel="column", tp_size=2)  # e.g. an odd vocabulary
