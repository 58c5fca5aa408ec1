"""The scheme units' kernel hook, lowbit.kernels.linear(method, layer, x): for every scheme of the
unit catalog it either runs a kernel that computes what the unit's reference forward computes, or
declines (None) for the cases without a kernel. Kernels run in TRITON_INTERPRET mode without a GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")

from lowbit import kernels  # noqa: E402
from lowbit.kernels import dispatch  # noqa: E402

from test_methods_common import SCHEMES, build, load, make_disk, shapes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NO_KERNEL = {"modelopt-fp8-pb-wo", "ct-fp8-block", "ct-w8a8-static-asym"}  # block scales, asymmetric acts


@pytest.fixture(autouse=True)
def _interpreted_kernels_count_as_available(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "available", lambda device=None: True)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_hook_matches_the_units_reference(name):
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    layer = build(scheme, sizes, k, dtype=torch.bfloat16, bias=True)
    disks = [make_disk(scheme, n, k) for n in sizes]
    for d in disks[1:]:  # fused shards quantize one input: one activation scale
        d.update({r: v for r, v in disks[0].items() if r.startswith("input")})
    bias = {i: {"bias": torch.randn(n)} for i, n in enumerate(sizes)}
    load(layer, {i: {**disks[i], **bias[i]} for i in range(len(sizes))})
    layer.to(DEV)
    x = torch.randn(5, k, dtype=torch.bfloat16, device=DEV)
    y = kernels.linear(layer.method, layer, x)
    if name in NO_KERNEL:
        assert y is None
        return
    ref = layer.method.reference_forward(layer, x).float()
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_w4a4_emulation_stays_on_the_reference():
    scheme = SCHEMES["modelopt-nvfp4"]
    sizes, k = shapes(scheme)
    layer = build(scheme, sizes, k, dtype=torch.bfloat16, activation_quant="emulate")
    disk = make_disk(scheme, sum(sizes), k)
    load(layer, {None: disk})
    assert kernels.linear(layer.method, layer, torch.randn(2, k, dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("name", ["modelopt-w4a16-nvfp4", "ct-nvfp4", "ct-w4a16-g32-asym", "ct-w4a16-channel-asym"])
def test_hook_takes_planar_weights(name):
    """A unit that keeps its 4-bit weight in the planar layout (prepared once at load) gets the
    same function from the hook: NVFP4 recognised by dtype, int4 by layer.weight_layout."""
    scheme = SCHEMES[name]
    sizes, k = shapes(scheme)
    layer = build(scheme, sizes, k, dtype=torch.bfloat16)
    load(layer, {None: make_disk(scheme, sum(sizes), k)})
    layer.to(DEV)
    x = torch.randn(3, k, dtype=torch.bfloat16, device=DEV)
    ref = layer.method.reference_forward(layer, x).float()
    w = layer.weight_packed.data
    if scheme.weight == "nvfp4":
        layer.weight_packed = torch.nn.Parameter(kernels.prepare_nvfp4(w), requires_grad=False)
    else:
        layer.weight_packed = torch.nn.Parameter(kernels.prepare_int4(w, k), requires_grad=False)
        layer.weight_layout = "planar"
    y = kernels.linear(layer.method, layer, x)
    assert y is not None and ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
