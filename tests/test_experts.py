"""The stacked-experts unit (lowbit/quant/experts.py) and the MoE block (lowbit/layers/moe.py).

For every scheme of spec section 2 (the catalog of test_methods_common): each expert of a stack
loaded from random per-expert on-disk tensors means exactly what the 2-D scheme unit makes of the
same tensors (weights, every scale kept per expert and per shard); the fused bf16 form equals the
per-expert form; unwritten slots and bad tensors are refused with the expert named; tensor
parallelism on the intermediate dimension adds up to tp=1; and the MoE block equals transformers'
Qwen3MoeSparseMoeBlock in fp32. `build_experts` is shared with test_moe_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import CheckpointError
from lowbit.kernels.moe_ref import Routing, route_ref
from lowbit.layers.moe import MoEBlock
from lowbit.quant.base import RunOptions
from lowbit.quant.experts import ExpertLinear, Experts, ExpertSpec
from lowbit.quant.formats import check_tensor
from lowbit.quant.scheme import Scheme
from lowbit.checkpoint import TORCH_TO_ST
from test_methods_common import SCHEMES, build, load, make_disk

ALL = dict(SCHEMES, **{"bf16": Scheme(weight="bf16"), "fp32": Scheme(weight="fp32")})


def dims(scheme: Scheme) -> tuple[int, int]:
    """(H, I): FP8 128x128 blocks need whole blocks per shard; else small, K not a multiple of 128."""
    return (128, 128) if scheme.granularity == "block" else (96, 32)


def disk_expert(scheme: Scheme, h: int, i: int, gated: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Random on-disk tensors of one expert, by projection name."""
    if not scheme.quantized:
        return {p: {"weight": torch.randn(*shape) / shape[1] ** 0.5}
                for p, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))
                if gated or p != "gate_proj"}
    out = {"up_proj": make_disk(scheme, i, h), "down_proj": make_disk(scheme, h, i)}
    if gated:
        out["gate_proj"] = make_disk(scheme, i, h)
    return out


def build_experts(scheme, num_experts=3, h=None, i=None, dtype=torch.float32, gated=True, activation="silu",
                  tp_rank=0, tp_size=1, disk=None, **options):
    """A loaded Experts unit and the on-disk tensors it was loaded from ([expert][proj][role])."""
    dh, di = dims(scheme)
    h, i = h or dh, i or di
    disk = disk or [disk_expert(scheme, h, i, gated) for _ in range(num_experts)]
    first_kind = "gate_up" if gated else "up"
    stacks = [ExpertLinear(scheme, ExpertSpec(f"model.layers.0.mlp.experts.{kind}_proj", kind, num_experts, h, i,
                                              tp_rank, tp_size), dtype, RunOptions(**options))
              for kind in (first_kind, "down")]
    for e, projs in enumerate(disk):
        for proj, tensors in projs.items():
            stack = stacks[1] if proj == "down_proj" else stacks[0]
            for role, t in tensors.items():
                stack.load(role, t, e, stack.spec.shard_names.index(proj))
    experts = Experts(stacks[0], stacks[1], activation)
    experts.notes = experts.finalize()
    return experts, disk


def routed(t: int, num_experts: int, k: int, dtype=torch.float32):
    """Random routing of t tokens: distinct experts per token, positive weights."""
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(t)]).to(torch.int32)
    return ids, torch.rand(t, k, dtype=dtype) + 0.1


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_expert_is_the_2d_unit(name):
    """Stacking is lossless: expert e dequantizes and runs exactly as the 2-D unit loaded from
    expert e's tensors (gate/up fused as two shards), for every scheme."""
    scheme = ALL[name]
    experts, disk = build_experts(scheme)
    h, i = dims(scheme)
    x = torch.randn(4, h)
    for e in (0, 2):
        gate_up = build(scheme, (i, i), h)
        load(gate_up, {0: disk[e]["gate_proj"], 1: disk[e]["up_proj"]})
        down = build(scheme, (h,), i)
        load(down, {0: disk[e]["down_proj"]})
        assert torch.equal(experts.first.dequantize(e), gate_up.method.dequantize(gate_up))
        assert torch.equal(experts.down.dequantize(e), down.method.dequantize(down))
        assert torch.equal(experts.first.reference(x, e), gate_up(x))
        hx = torch.randn(4, i)
        assert torch.equal(experts.down.reference(hx, e), down(hx))
    # the per-expert on-disk table is the 2-D unit's, and the tensors fit it
    for role, t in disk[0]["gate_proj"].items():
        spec = experts.first.disk_tensors(i, h)[role]
        assert check_tensor(spec, TORCH_TO_ST[t.dtype], tuple(t.shape)) is None, role


@pytest.mark.parametrize("name", ["modelopt-nvfp4", "ct-nvfp4"])
def test_nvfp4_w4a4_emulate(name):
    """W4A4 runs weight-only by default (with the 2-D unit's note) and emulates the activation
    numerics when asked, exactly as the 2-D unit does."""
    scheme = SCHEMES[name]
    experts, disk = build_experts(scheme, activation_quant="emulate")
    h, i = dims(scheme)
    unit = build(scheme, (i, i), h, activation_quant="emulate")
    load(unit, {0: disk[1]["gate_proj"], 1: disk[1]["up_proj"]})
    x = torch.randn(3, h)
    assert torch.equal(experts.first.reference(x, 1), unit(x))
    weight_only, _ = build_experts(scheme, disk=disk)
    assert not torch.equal(weight_only.first.reference(x, 1), unit(x))
    assert any("runs weight-only" in n for n in weight_only.notes)


def test_scales_stay_per_expert():
    """Experts with different global and input scales keep theirs (no collapse across experts)."""
    scheme = SCHEMES["modelopt-nvfp4"]
    experts, disk = build_experts(scheme, num_experts=4)
    rs = experts.first.row_scale
    for e in range(4):
        i = dims(scheme)[1]
        assert torch.equal(rs[e, :i], disk[e]["gate_proj"]["weight_scale_2"].expand(i))
        assert torch.equal(rs[e, i:], disk[e]["up_proj"]["weight_scale_2"].expand(i))
        want = max(disk[e]["gate_proj"]["input_scale"], disk[e]["up_proj"]["input_scale"])
        assert experts.first.input_scale[e] == want
        assert experts.down.input_scale[e] == disk[e]["down_proj"]["input_scale"]
    assert len(set(experts.down.input_scale.tolist())) == 4
    assert any("different input_scale" in n for n in experts.notes)
    ct = SCHEMES["ct-nvfp4"]  # compressed-tensors global scales are divisors: stored as multipliers
    experts, disk = build_experts(ct, num_experts=2)
    assert torch.allclose(experts.down.row_scale[1], 1 / disk[1]["down_proj"]["weight_global_scale"])


def test_reference_forward_is_the_per_expert_sum():
    """Experts.reference = sum over k of w * down(act(gate) * up) with the 2-D units, per token."""
    scheme = SCHEMES["ct-w4a16-g32-asym"]
    experts, disk = build_experts(scheme, num_experts=4)
    h, i = dims(scheme)
    x = torch.randn(6, h)
    ids, w = routed(6, 4, 2)
    y = experts(x, ids, w)
    want = torch.zeros_like(x)
    for t in range(6):
        for j in range(2):
            e = int(ids[t, j])
            g = experts.first.dequantize(e) @ x[t]
            a = torch.nn.functional.silu(g[:i]) * g[i:]
            want[t] += w[t, j] * (experts.down.dequantize(e) @ a)
    assert ((y - want).norm() / want.norm()).item() < 1e-6


def test_capturable_reference_equals_the_reference():
    """The sync-free reference (used inside a CUDA-graph capture) gives the reference's values: every
    expert on every row, each row keeping only its own experts, including experts no row routes to."""
    scheme = SCHEMES["ct-w4a16-g32-asym"]
    experts, _ = build_experts(scheme, num_experts=4)
    h, _ = dims(scheme)
    x = torch.randn(5, h)
    ids, w = routed(5, 4, 2)
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # expert 3: at most in the second slot
    want = experts.reference(x, ids, w)
    got = experts._reference_capturable(x, ids, w, torch.zeros_like(x))
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_fused_transformers_form_equals_per_expert():
    """transformers 5's experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I] load like per expert."""
    experts, disk = build_experts(Scheme(weight="bf16"), num_experts=3, dtype=torch.bfloat16)
    gate_up = torch.stack([torch.cat([d["gate_proj"]["weight"], d["up_proj"]["weight"]]) for d in disk])
    down = torch.stack([d["down_proj"]["weight"] for d in disk])
    h, i = dims(Scheme())
    fused = [ExpertLinear(Scheme(weight="bf16"), ExpertSpec("m.experts.gate_up_proj", kind, 3, h, i), torch.bfloat16)
             for kind in ("gate_up", "down")]
    assert fused[0].fused_disk_tensors()["weight"].shape == (3, 2 * i, h)
    assert fused[1].fused_disk_tensors()["weight"].shape == (3, h, i)
    fused[0].load("weight", gate_up, None, None)
    fused[1].load("weight", down, None, None)
    assert not fused[0].finalize() and not fused[1].finalize()
    assert torch.equal(fused[0].weight, experts.first.weight) and torch.equal(fused[1].weight, experts.down.weight)


def test_unwritten_and_bad_tensors_are_named():
    scheme = SCHEMES["modelopt-nvfp4"]
    h, i = dims(scheme)
    disk = [disk_expert(scheme, h, i) for _ in range(3)]
    del disk[1]["up_proj"]["weight_scale"]
    with pytest.raises(CheckpointError, match=r"weight_scale: never written for expert\(s\) 1"):
        build_experts(scheme, disk=disk)
    disk = [disk_expert(scheme, h, i) for _ in range(3)]
    del disk[2]["gate_proj"]["input_scale"]
    with pytest.raises(CheckpointError, match=r"input_scale: never written for expert\(s\) 2"):
        build_experts(scheme, disk=disk)
    disk = [disk_expert(scheme, h, i) for _ in range(3)]
    disk[0]["down_proj"]["weight"] = disk[0]["down_proj"]["weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj .*weight: shape"):
        build_experts(scheme, disk=disk)
    stack = ExpertLinear(scheme, ExpertSpec("m.experts.down_proj", "down", 3, h, i), torch.float32)
    with pytest.raises(CheckpointError, match="expert 3 does not exist"):
        stack.load("weight", disk[0]["down_proj"]["weight"], 3, 0)


@pytest.mark.parametrize("name", ["bf16", "modelopt-w4a16-nvfp4", "ct-w4a16-g32-asym", "modelopt-fp8-pb-wo",
                                  "ct-w8a16-channel"])
def test_tensor_parallel_adds_up(name):
    """tp=2 on the intermediate dimension: each rank's partial outputs sum to tp=1's (float64)."""
    scheme = ALL[name]
    h = 128 if scheme.granularity == "block" else 96
    i = 256 if scheme.granularity == "block" else 64  # block: whole 128-row blocks per rank and shard
    full, disk = build_experts(scheme, num_experts=3, h=h, i=i, dtype=torch.float64)
    x = torch.randn(5, h, dtype=torch.float64)
    ids, w = routed(5, 3, 2, torch.float64)
    parts = [build_experts(scheme, num_experts=3, h=h, i=i, dtype=torch.float64, tp_rank=r, tp_size=2, disk=disk)[0]
             for r in range(2)]
    y = sum(p(x, ids, w) for p in parts)
    want = full(x, ids, w)
    assert ((y - want).norm() / want.norm()).item() < 1e-12
    n_local = parts[0].first.dequantize(0).shape
    assert n_local == (i, h) and parts[0].down.dequantize(0).shape == (h, i // 2)


@pytest.mark.parametrize("activation,gated", [("gelu_tanh", True), ("relu2", False)])
def test_activations_and_non_gated(activation, gated):
    scheme = SCHEMES["ct-fp8-w8a16"]
    experts, _ = build_experts(scheme, num_experts=3, gated=gated, activation=activation)
    h, i = dims(scheme)
    x = torch.randn(4, h)
    ids, w = routed(4, 3, 2)
    fn = {"gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
          "relu2": lambda v: torch.relu(v) ** 2}[activation]
    want = torch.zeros_like(x)
    for t in range(4):
        for j in range(2):
            e = int(ids[t, j])
            g = experts.first.dequantize(e) @ x[t]
            a = fn(g[:i]) * g[i:] if gated else fn(g)
            want[t] += w[t, j] * (experts.down.dequantize(e) @ a)
    y = experts(x, ids, w)
    assert ((y - want).norm() / want.norm()).item() < 1e-6


def test_moe_block_equals_transformers_qwen3_moe():
    """MoEBlock(Qwen3 routing, bf16-scheme experts in fp32) vs Qwen3MoeSparseMoeBlock in fp32."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8,
                                      num_experts_per_tok=3, norm_topk_prob=True, hidden_act="silu")
    ref = Qwen3MoeSparseMoeBlock(cfg).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    scheme = Scheme(weight="fp32")
    stacks = [ExpertLinear(scheme, ExpertSpec(f"experts.{k}_proj", k, 8, 64, 32), torch.float32)
              for k in ("gate_up", "down")]
    stacks[0].load("weight", ref.experts.gate_up_proj.detach(), None, None)
    stacks[1].load("weight", ref.experts.down_proj.detach(), None, None)
    experts = Experts(*stacks, activation="silu")
    experts.finalize()
    block = MoEBlock(64, Routing(3, renormalize=True), experts, torch.float32, weights_in_logits_dtype=True)
    block.gate.weight.data.copy_(ref.gate.weight.detach())
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        want = ref(x)
    y = block(x)
    assert ((y - want).norm() / want.norm()).item() <= 1e-5


def test_moe_block_shared_expert_gate_and_sigmoid_routing():
    """Qwen2/3.5-MoE shared expert with its sigmoid gate; Nemotron-H sigmoid + bias routing."""
    experts, _ = build_experts(Scheme(weight="fp32"), num_experts=4, h=32, i=16)
    shared = torch.nn.Linear(32, 32, bias=False)
    block = MoEBlock(32, Routing(2, "sigmoid", renormalize=True, scaling=2.5), experts, torch.float32,
                     shared_expert=shared, shared_expert_gate=True, correction_bias=True)
    block.gate.weight.data.normal_()
    block.gate.e_score_correction_bias.data.normal_()
    block.shared_expert_gate.weight.data.normal_()
    x = torch.randn(5, 32)
    w, ids = route_ref(block.gate(x), block.routing, block.gate.e_score_correction_bias)
    choice = torch.sigmoid(x @ block.gate.weight.T) + block.gate.e_score_correction_bias
    assert torch.equal(ids.sort(-1)[0].long(), choice.topk(2, -1)[1].sort(-1)[0])
    assert torch.allclose(w.sum(-1), torch.full((5,), 2.5))
    want = experts.reference(x, ids, w) + torch.sigmoid(x @ block.shared_expert_gate.weight.T) * shared(x)
    with torch.no_grad():
        assert torch.allclose(block(x), want, rtol=1e-5, atol=1e-6)
