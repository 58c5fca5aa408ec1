"""End-to-end: every fixture folder loads and its logits agree with reference_logits.safetensors.

Two comparisons (spec section 8: tight only where the arithmetic matches):

1. `lowbit.load` + `Model.logits`, bf16, for every folder. lowbit's bf16 model does not round
   like transformers' (base-llama-bf16 itself: relative L2 0.0065 against its reference), and
   activation quantizers amplify any such difference, so the bounds are per kind of scheme and
   loose where activations are quantized; each bound states what was measured.
2. lowbit's loaded projections (the scheme units) swapped into transformers' own bf16 model, so
   that everything but the projections is the reference's arithmetic. Where lowbit's numerics
   are the reference's (all ModelOpt exports with activation_quant="emulate"; compressed-tensors
   weight-only), the logits agree to this machine's floor: transformers' own unquantized model
   differs from the base reference by 0.0032 here (the references were made on another CPU).
   Measured: ModelOpt FP8 0 to 8e-7, ModelOpt NVFP4 W4A4 emulated 0 to 2.4e-5, W4A16_NVFP4 2.5e-4,
   CT NVFP4A16 0, CT W4A16/W8A16 0.002.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from conftest import FIXTURES, all_fixture_names, fixture_dir
from lowbit.names import to_canonical

W4A4 = ("modelopt-nvfp4", "modelopt-nvfp4-fused", "modelopt-nvfp4-lmhead", "modelopt-nvfp4-phi3",
        "modelopt-nvfp4-vlm-new", "modelopt-nvfp4-vlm-old", "modelopt-mixed", "modelopt-mixed-lmhead",
        "llmcompressor-nvfp4", "llmcompressor-nvfp4-lmhead", "llmcompressor-nvfp4-phi3",
        "llmcompressor-nvfp4-vlm-old", "modelopt-nvfp4-qwen3moe")
# Qwen3.5 W4A4: measured 0.199 (ModelOpt, emulate) and 0.205 (llm-compressor, auto; emulate 0.218). The
# activation quantizers sit on every projection of 4 layers incl. the Gated DeltaNet ones, and the
# bf16 model alone differs by 0.0075; ModelOpt's own two references (pre-export fake-quant vs the
# export) differ by 0.285, quantization moves the logits 0.30 from the bf16 base
W4A4_HYBRID = ("modelopt-nvfp4-qwen3_5", "modelopt-nvfp4-qwen3_5-vlm", "llmcompressor-nvfp4-qwen3_5")
ACT8 = ("modelopt-fp8", "modelopt-fp8-kvfp8", "modelopt-fp8-lmhead", "modelopt-fp8-phi3",
        "llmcompressor-fp8_dynamic", "llmcompressor-fp8_dynamic-lmhead", "llmcompressor-w8a8",
        "llmcompressor-w8a8-lmhead")


def reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref = load_file(fixture_dir(name) / "reference_logits.safetensors")
    # ModelOpt: the model rebuilt from the exported bytes; the KV-cache variant has only the
    # pre-export fake-quant `logits` (its README); llm-compressor: transformers' reload.
    return ref["input_ids"], ref["logits_dequant_export"] if "logits_dequant_export" in ref else ref["logits"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def lowbit_bound(name: str) -> tuple[str, float]:
    """(activation_quant mode, relative-L2 bound) for comparison 1."""
    if name in W4A4_HYBRID:
        return ("emulate" if name.startswith("modelopt") else "auto"), 0.25
    if name == "modelopt-nvfp4-lmhead-nemotronh":
        # NVFP4 activations on this tiny Mamba hybrid turn any rounding into ~20%: measured 0.210, and
        # lowbit's own bf16 and fp32 emulated forwards differ by 0.247 (weight-only: 0.009)
        return "emulate", 0.3
    if name in W4A4:
        # emulate = the reference's W4A4 activation numerics; NVFP4 activations turn small model-level
        # rounding differences into 11-18% (measured 0.066-0.175), as spec section 8 describes
        return "emulate", 0.2
    if name in ACT8 or name == "llmcompressor-w8a8-gemma3":
        # FP8/int8 activations: measured 0.020-0.056 (kvfp8: 0.052 against the pre-export model with
        # its FP8 KV cache); compressed-tensors computes activation scales in bf16 (and int8 ones
        # as amax/127.5), lowbit in fp32 with amax/127
        return "auto", 0.08
    if name == "base-gemma3-bf16":  # (1 + w) norms at every sublayer round once more: measured 0.0098
        return "auto", 0.015
    if name == "base-qwen3_5-bf16":  # CPU 0.0063-0.0075; on an H200 0.0100: the Gated DeltaNet chunk
        # kernel's dots run in tf32 where the reference runs the rule in fp32 (kernels/gated_delta.py)
        return "auto", 0.015
    return "auto", 0.01  # unquantized and weight-only: measured 0.0063-0.0075 (Qwen3.5), the bf16 model floor


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def supported(names):
    from test_resolve_fixtures import PENDING

    return [n for n in names if n not in PENDING]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", supported(all_fixture_names()))
def test_lowbit_logits_match_the_reference(name, device):
    mode, bound = lowbit_bound(name)
    ids, ref = reference(name)
    model = lowbit.load(fixture_dir(name), device=device, dtype=torch.bfloat16, activation_quant=mode,
                        progress=False)
    err = rel_l2(model.logits(ids.to(device)).cpu(), ref)
    assert err < bound, f"{name}: relative L2 {err:.4g} >= {bound} (activation_quant={mode})"


@pytest.mark.parametrize("name", [n for n in supported(all_fixture_names()) if n.startswith("base-")])
def test_fp32_logits_match_the_fp32_reference(name):
    """Base fixtures carry transformers' fp32 forward (`logits_fp32_compute`): same arithmetic, so tight."""
    ref = load_file(fixture_dir(name) / "reference_logits.safetensors")
    if "logits_fp32_compute" not in ref:
        pytest.skip(f"{name} has no fp32 reference")
    model = lowbit.load(fixture_dir(name), device="cpu", dtype=torch.float32, progress=False)
    err = rel_l2(model.logits(ref["input_ids"].reshape(1, -1)), ref["logits_fp32_compute"].reshape(1, -1, model.config.vocab_size))
    assert err < 1e-5, f"{name}: relative L2 {err:.3g} against transformers' fp32 forward"


def test_w4a4_checkpoints_run_weight_only_by_default_and_say_so():
    model = lowbit.load(fixture_dir("modelopt-nvfp4"), device="cpu", dtype=torch.bfloat16, progress=False)
    assert any("runs weight-only" in n for n in model.report.notes)
    emulated = lowbit.load(fixture_dir("modelopt-nvfp4"), device="cpu", dtype=torch.bfloat16,
                           activation_quant="emulate", progress=False)
    ids, ref = reference("modelopt-nvfp4")
    assert rel_l2(emulated.logits(ids), ref) < rel_l2(model.logits(ids), ref)  # measured 0.116 vs 0.171


# ---------------------------------------------------------------- 2. units inside transformers
# one folder per scheme family and layout (the VLM-named copies decode the same bytes); -lmhead
# variants also run a quantized lm_head. Not here: compressed-tensors with quantized activations
# (its reference computes activation scales in bf16, lowbit in fp32) and the FP8-KV-cache folder
# (its reference is the pre-export model).
MATCHING = ["modelopt-fp8", "modelopt-fp8-lmhead", "modelopt-fp8-phi3", "modelopt-nvfp4", "modelopt-nvfp4-fused",
            "modelopt-nvfp4-lmhead", "modelopt-mixed-lmhead", "modelopt-w4a16_nvfp4-lmhead",
            "llmcompressor-nvfp4a16-lmhead", "llmcompressor-w4a16-lmhead", "llmcompressor-w8a16-lmhead"]
SPLIT = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class ShardOf(nn.Module):
    """One split projection of transformers' model served by lowbit's fused group (its rows)."""

    def __init__(self, group: nn.Module, rows: slice):
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, x):
        return self.group(x)[..., self.rows]


_HF: dict[str, nn.Module] = {}  # transformers' base models, loaded once per architecture


def transformers_with_lowbit_projections(name: str, mode: str):
    from transformers import AutoModelForCausalLM

    model = lowbit.load(fixture_dir(name), device="cpu", dtype=torch.bfloat16, activation_quant=mode, progress=False)
    base = "base-phi3-bf16" if model.config.architecture == "Phi3ForCausalLM" else "base-llama-bf16"
    if base not in _HF:
        _HF[base] = AutoModelForCausalLM.from_pretrained(FIXTURES / base, dtype=torch.bfloat16,
                                                         attn_implementation="eager")
    hf = copy.deepcopy(_HF[base])
    groups = dict(model.net.named_modules())
    for hf_name, mod in list(hf.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        prefix, leaf = hf_name.rpartition(".")[::2]
        if hf_name in groups:
            new = groups[hf_name]
        else:
            fused, i = SPLIT[leaf]
            group = groups[f"{prefix}.{fused}"]
            sizes = [p.spec.shard_sizes for p in group.parts]
            sizes = sizes[0] if len(sizes) == 1 else [s for ss in sizes for s in ss]
            new = ShardOf(group, slice(sum(sizes[:i]), sum(sizes[:i + 1])))
        hf.get_submodule(prefix).register_module(leaf, new) if prefix else setattr(hf, leaf, new)
    on_disk = load_file(fixture_dir(name) / "model.safetensors")
    by_canonical = {to_canonical(k): v for k, v in on_disk.items()}
    for pname, p in hf.named_parameters():
        if pname in by_canonical:  # embeddings and norms as written in the fixture
            p.data.copy_(by_canonical[pname])
    return hf


@pytest.mark.parametrize("name", MATCHING)
def test_scheme_units_reproduce_the_reference_inside_transformers(name):
    ids, ref = reference(name)  # skips when the fixtures are absent
    hf = transformers_with_lowbit_projections(name, "emulate")
    with torch.no_grad():
        err = rel_l2(hf(ids).logits, ref)
    assert err < 0.005, f"{name}: relative L2 {err:.3g} (machine floor 0.0032)"
