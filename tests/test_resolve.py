"""Per-layer scheme resolution (spec sections 3 and 7), the tensor cross-check, --trust-tensors, and the
on-disk tensor table (spec section 2). Checkpoints are hand-made, header-only, in tmp_path."""
from __future__ import annotations

import pytest

from ckpt_utils import model_tensors, tiny_config, write_checkpoint
from lowbit.checkpoint import Checkpoint
from lowbit.quant.base import TensorSpec
from lowbit.quant.config import modelopt_scheme
from lowbit.quant.formats import check_tensor, expected_tensors
from lowbit.quant.match import pattern_matches
from lowbit.quant.resolve import resolve
from lowbit.quant.scheme import Scheme

CT = "compressed-tensors"
NVFP4, W4A16_NVFP4, FP8 = modelopt_scheme("NVFP4"), modelopt_scheme("W4A16_NVFP4"), modelopt_scheme("FP8")
BF16 = Scheme(weight="bf16")
CT_NVFP4 = Scheme(weight="nvfp4", granularity="group", group_size=16, activation="nvfp4", act_granularity="group",
                  fmt=CT)
CT_W4A16 = Scheme(weight="int4", granularity="group", group_size=32, packed=True, fmt=CT)
L0 = "model.layers.0"
QKV = ("q_proj", "k_proj", "v_proj")


def modelopt(algo, exclude=(), **kw):
    return {"quant_method": "modelopt", "quant_algo": algo, "ignore": list(exclude),
            "producer": {"name": "modelopt", "version": "0.47.0"}, **kw}


def ct_nvfp4(targets=("Linear",), ignore=("lm_head",)):
    w = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
         "dynamic": False}
    return {"quant_method": CT, "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "ignore": list(ignore), "config_groups": {"group_0": {"targets": list(targets), "weights": w,
                                                                  "input_activations": dict(w, dynamic="local")}}}


def build(tmp_path, scheme_of, qc=None, hf=None, fused=False, layout="text", edit=None, kv=False, trust=False,
          **overrides):
    cfg = tiny_config("Phi3ForCausalLM" if fused else "LlamaForCausalLM", qc, **overrides)
    tensors = model_tensors(cfg, scheme_of, fused=fused, layout=layout, kv_scales=kv)
    if edit:
        edit(tensors)
    write_checkpoint(tmp_path, tensors, cfg, hf, header_only=True)
    return resolve(Checkpoint(tmp_path), trust_tensors=trust)


def schemes(plan):
    return {name: lp.scheme for name, lp in plan.layers.items()}


def problems(plan):
    return "\n".join(str(p) for p in plan.problems)


def quantized_but(*excluded, scheme=NVFP4):
    return lambda m: BF16 if any(m == e or m.endswith("." + e) for e in excluded) else scheme


# -- section 7 behaviours ----------------------------------------------------------------------------------

def test_nvfp4_config_with_unexcluded_lm_head_quantizes_it(tmp_path):
    plan = build(tmp_path, lambda m: NVFP4, modelopt("NVFP4", ["model.embed_tokens"]))
    assert plan.layers["lm_head"].scheme == NVFP4 and not plan.problems
    assert plan.layers["lm_head"].reason == "global quant_algo NVFP4"


def test_exclude_lm_head_leaves_it_unquantized(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head"]))
    assert plan.layers["lm_head"].scheme == BF16 and not plan.problems
    assert all(s == NVFP4 for n, s in schemes(plan).items() if n != "lm_head")


def test_mixed_config_with_quantized_lm_head(tmp_path):
    layers = {"lm_head": {"quant_algo": "NVFP4", "group_size": 16}}
    plan = build(tmp_path, lambda m: NVFP4 if m == "lm_head" else BF16,
                 modelopt("MIXED_PRECISION", quantized_layers=layers))
    assert plan.layers["lm_head"].scheme == NVFP4 and not plan.problems
    assert plan.layers[f"{L0}.mlp.down_proj"].scheme == BF16


def test_weight_only_and_w4a4_dispatch(tmp_path):
    a = build(tmp_path / "a", lambda m: W4A16_NVFP4, modelopt("W4A16_NVFP4"))
    b = build(tmp_path / "b", lambda m: NVFP4, modelopt("NVFP4"))
    assert {s.activation for s in schemes(a).values()} == {"none"}
    assert {s.activation for s in schemes(b).values()} == {"nvfp4"}


def test_mixed_config_dispatches_per_layer_and_leaves_unlisted_unquantized(tmp_path):
    want = {f"{L0}.self_attn.q_proj": FP8, f"{L0}.self_attn.k_proj": FP8, f"{L0}.self_attn.v_proj": FP8,
            f"{L0}.mlp.gate_proj": NVFP4, f"{L0}.mlp.up_proj": NVFP4, f"{L0}.mlp.down_proj": W4A16_NVFP4}
    layers = {n: {"quant_algo": s.algo} for n, s in want.items()}
    plan = build(tmp_path, lambda m: want.get(m, BF16), modelopt("MIXED_PRECISION", quantized_layers=layers))
    assert not plan.problems
    got = schemes(plan)
    for name, s in got.items():
        assert s == want.get(name, BF16), name
    assert got[f"{L0}.self_attn.o_proj"] == BF16 and got["model.layers.1.mlp.up_proj"] == BF16


@pytest.mark.parametrize("listed, fused_slot, unquantized", [
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_up_proj", "mlp.down_proj"),
    (("mlp.gate_proj",), None, "mlp.down_proj"),
    (("self_attn.o_proj",), None, "self_attn.q_proj"),
])
def test_mixed_listing_and_fusion(tmp_path, listed, fused_slot, unquantized):
    names = {f"{L0}.{x}" for x in listed}
    plan = build(tmp_path, lambda m: NVFP4 if m in names else BF16,
                 modelopt("MIXED_PRECISION", quantized_layers={n: {"quant_algo": "NVFP4"} for n in names}))
    assert not plan.problems
    assert all(plan.layers[n].scheme == NVFP4 for n in names)
    assert plan.layers[f"{L0}.{unquantized}"].scheme == BF16
    if fused_slot:  # gate + up listed: one fused, quantized gate_up_proj
        slot = next(s for s in plan.slots if s.fused_name == f"{L0}.{fused_slot}")
        assert [[p.name for p in g] for g in plan.slot_parts(slot)] == [[f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"]]
    if listed == ("self_attn.o_proj",):  # qkv unquantized, still one fused bf16 projection
        slot = next(s for s in plan.slots if s.fused_name == f"{L0}.self_attn.qkv_proj")
        assert len(plan.slot_parts(slot)) == 1 and plan.slot_parts(slot)[0][0].scheme == BF16


def test_prefix_candidates_lm_head_and_vlm_layouts(tmp_path):
    # tensors in the old VLM layout, config names in the new one and bare
    layers = {"model.language_model.layers.0.mlp.down_proj": {"quant_algo": "FP8"}, "lm_head": {"quant_algo": "FP8"}}
    want = {f"{L0}.mlp.down_proj": FP8, "lm_head": FP8}
    plan = build(tmp_path, lambda m: want.get(m, BF16), modelopt("MIXED_PRECISION", quantized_layers=layers),
                 layout="vlm-old")
    assert not plan.problems, problems(plan)
    assert plan.layers["lm_head"].scheme == FP8 and plan.layers["lm_head"].tensors["weight"] == "language_model.lm_head.weight"
    assert plan.layers[f"{L0}.mlp.down_proj"].tensors["weight"] == "language_model.model.layers.0.mlp.down_proj.weight"
    assert plan.params["model.norm.weight"] == "language_model.model.norm.weight"


def test_language_model_lm_head_exclude_matches_lm_head(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["language_model.lm_head"]))
    assert plan.layers["lm_head"].scheme == BF16 and not plan.problems


@pytest.mark.parametrize("targets, ignore, head", [
    (("Linear", "lm_head"), (), CT_NVFP4),  # an explicit lm_head target quantizes the head
    (("Linear", "lm_head"), ("lm_head",), Scheme(weight="bf16")),  # lm_head in ignore wins
    (("re:.*_proj$",), (), Scheme(weight="bf16")),  # no target matches the head
])
def test_compressed_tensors_lm_head_rules(tmp_path, targets, ignore, head):
    plan = build(tmp_path, lambda m: head if m == "lm_head" else CT_NVFP4, ct_nvfp4(targets, ignore))
    assert plan.layers["lm_head"].scheme == head and not plan.problems, problems(plan)


def test_linear_target_reading_of_lm_head_follows_the_tensors(tmp_path):
    """'Linear' does not cover lm_head in lowbit's reading; llm-compressor quantizes it (nn.Linear). Either
    tensor layout is accepted; a quantized head is reported as a note."""
    a = build(tmp_path / "a", lambda m: CT_NVFP4, ct_nvfp4(("Linear",), ()))
    assert a.layers["lm_head"].scheme == CT_NVFP4 and not a.problems
    assert any("lm_head" in n and "llm-compressor" in n for n in a.notes)
    b = build(tmp_path / "b", quantized_but("lm_head", scheme=CT_NVFP4), ct_nvfp4(("Linear",), ()))
    assert b.layers["lm_head"].scheme == BF16 and not b.problems


@pytest.mark.parametrize("scalar", [(), (1,)])
def test_scalar_scales_0d_or_1(tmp_path, scalar):
    def edit(t):
        for n, (d, s) in list(t.items()):
            if s in ((), (1,)):
                t[n] = (d, scalar)
    plan = build(tmp_path, lambda m: NVFP4, modelopt("NVFP4"), edit=edit)
    assert not plan.problems


def test_fused_on_disk_resolves_as_one_module(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head"]), fused=True)
    assert not plan.problems
    qkv = plan.layers[f"{L0}.self_attn.qkv_proj"]
    assert qkv.shard is None and qkv.scheme == NVFP4 and qkv.tensors["weight_scale_2"].endswith("qkv_proj.weight_scale_2")
    slot = next(s for s in plan.slots if s.fused_name == qkv.name)
    assert plan.slot_parts(slot) == [[qkv]]


# -- section 3 rules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, name, hit", [
    ("lm_head", "lm_head", True),
    ("lm_head", "language_model.lm_head", True),  # bare leaf at a dot boundary
    ("v_proj", "model.layers.0.self_attn.v_proj", True),
    ("v_proj", "model.layers.0.self_attn.qkv_proj", False),  # never a plain substring
    ("proj", "model.layers.0.self_attn.o_proj", False),
    ("lm_head*", "lm_head", True),
    ("lm_head*", "language_model.lm_head", True),
    ("model.layers.1*", "model.layers.1.mlp.up_proj", True),  # * crosses dots
    ("model.layers.1*", "model.layers.0.mlp.up_proj", False),
    ("*.mlp.*", "model.layers.0.mlp.down_proj", True),
    ("vision_tower*", "model.layers.0.mlp.down_proj", False),
    ("re:.*down_proj", "model.layers.0.mlp.down_proj", True),
    ("re:down_proj", "model.layers.0.mlp.down_proj", False),  # re.match is anchored at the start
    ("re:model.layers.0.self_attn.(q|k)_proj$", "model.layers.0.self_attn.k_proj", True),
    ("re:model.layers.0.self_attn.(q|k)_proj$", "model.layers.0.self_attn.v_proj", False),
])
def test_pattern_rules(pattern, name, hit):
    assert pattern_matches(pattern, name) is hit


def test_exclude_glob_crosses_dots(tmp_path):
    plan = build(tmp_path, lambda m: BF16 if m.startswith("model.layers.1.") else FP8,
                 modelopt("FP8", ["model.layers.1*"]))
    assert not plan.problems
    assert {n for n, s in schemes(plan).items() if s == BF16} == {n for n in plan.layers if n.startswith("model.layers.1.")}


def test_ct_regex_ignore_and_class_target(tmp_path):
    plan = build(tmp_path, lambda m: BF16 if m.endswith("down_proj") or m == "lm_head" else CT_NVFP4,
                 ct_nvfp4(("Linear",), ("lm_head", "re:.*mlp.down_proj$")))
    assert not plan.problems
    assert plan.layers[f"{L0}.mlp.down_proj"].reason == "excluded by ignore entry 're:.*mlp.down_proj$'"
    assert plan.layers[f"{L0}.mlp.up_proj"].reason == "config_groups.group_0 target 'Linear'"


def test_ct_first_matching_group_wins(tmp_path):
    w4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}
    qc = ct_nvfp4(("Linear",))
    qc["config_groups"] = {"int4": {"targets": ["re:.*down_proj$"], "weights": w4, "format": "pack-quantized"},
                           **qc["config_groups"]}
    qc["format"] = "mixed-precision"
    plan = build(tmp_path, lambda m: BF16 if m == "lm_head" else CT_W4A16 if m.endswith("down_proj") else CT_NVFP4, qc)
    assert not plan.problems, problems(plan)
    assert plan.layers[f"{L0}.mlp.down_proj"].scheme == CT_W4A16 and plan.layers[f"{L0}.mlp.up_proj"].scheme == CT_NVFP4


def test_leaf_pattern_on_split_layout_runs_qkv_unfused(tmp_path):
    plan = build(tmp_path, quantized_but("v_proj", "lm_head"), modelopt("NVFP4", ["v_proj", "lm_head"]))
    assert not plan.problems
    slot = next(s for s in plan.slots if s.fused_name == f"{L0}.self_attn.qkv_proj")
    assert [[p.name.rsplit(".", 1)[1] for p in g] for g in plan.slot_parts(slot)] == [["q_proj", "k_proj"], ["v_proj"]]


def test_fused_name_entry_applies_to_all_shards(tmp_path):
    plan = build(tmp_path, lambda m: BF16 if m.startswith(f"{L0}.self_attn.") and m.endswith(QKV) else FP8,
                 modelopt("FP8", [f"{L0}.self_attn.qkv_proj"]))
    assert not plan.problems
    assert all(plan.layers[f"{L0}.self_attn.{s}"].scheme == BF16 for s in QKV)
    assert plan.layers["model.layers.1.self_attn.q_proj"].scheme == FP8
    layers = {f"{L0}.mlp.gate_up_proj": {"quant_algo": "NVFP4"}}
    plan = build(tmp_path / "mixed", lambda m: NVFP4 if m in (f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj") else BF16,
                 modelopt("MIXED_PRECISION", quantized_layers=layers))
    assert not plan.problems and plan.layers[f"{L0}.mlp.up_proj"].scheme == NVFP4


def test_leaf_pattern_never_excludes_a_fused_on_disk_module_by_substring(tmp_path):
    # vLLM's substring match makes "v_proj" exclude qkv_proj; lowbit reads it as naming the v shard,
    # which the file cannot leave unquantized (it is fused with q and k): reported, not silently applied.
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["v_proj", "lm_head"]), fused=True)
    assert plan.layers[f"{L0}.self_attn.qkv_proj"].scheme == NVFP4
    assert f"{L0}.self_attn.qkv_proj: the config gives the split projections different schemes" in problems(plan)


def test_vision_tensors_are_skipped_and_reported(tmp_path):
    def edit(t):
        t["vision_tower.blocks.0.attn.qkv.weight"] = ("BF16", (48, 16))
        t["multi_modal_projector.linear_1.weight"] = ("BF16", (64, 16))
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head", "vision_tower*"]), edit=edit)
    assert not plan.problems
    assert plan.skipped["vision_tower.blocks.0.attn.qkv.weight"].startswith("vision component")
    assert "multi_modal_projector.linear_1.weight" in plan.skipped


def test_unmatched_glob_is_a_note_not_a_problem(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head", "*mlp.gate", "vision_tower*"]))
    assert not plan.problems
    assert any("'*mlp.gate' matches no module" in n for n in plan.notes)


# -- broken variants: one problem each ---------------------------------------------------------------------

def test_broken_exclude_lm_head_glob_but_quantized_head(tmp_path):
    plan = build(tmp_path, lambda m: NVFP4, modelopt("NVFP4", ["lm_head*"]))
    assert [p.layer for p in plan.problems] == ["lm_head"]
    msg = plan.problems[0].message
    assert "unquantized bf16 (excluded by exclude_modules entry 'lm_head*')" in msg
    assert "the file holds W:nvfp4-g16 A:nvfp4-static-group" in msg and "weight U8 [256, 32]" in msg
    assert "--trust-tensors" in msg
    trusted = build(tmp_path / "t", lambda m: NVFP4, modelopt("NVFP4", ["lm_head*"]), trust=True)
    assert not trusted.problems and trusted.layers["lm_head"].scheme == NVFP4
    assert any(n.startswith("lm_head: override: the config says unquantized bf16") for n in trusted.notes)


def test_broken_ignore_names_split_projections_stored_fused(tmp_path):
    exclude = [f"{L0}.self_attn.{s}" for s in QKV] + ["lm_head"]
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", exclude), fused=True)
    assert [p.layer for p in plan.problems] == [f"{L0}.self_attn.qkv_proj"]
    msg = plan.problems[0].message
    assert "names the split projections of this fused-on-disk module" in msg and "the file holds W:nvfp4" in msg
    # only some shards named: the fused tensor cannot follow
    plan = build(tmp_path / "q", quantized_but("lm_head"), modelopt("NVFP4", [f"{L0}.self_attn.q_proj", "lm_head"]),
                 fused=True)
    assert "stores them fused as one tensor (model.layers.0.self_attn.qkv_proj)" in problems(plan)


def test_broken_vlm_exclude_list_matching_no_module(tmp_path):
    # exclude list in a wrapper layout lowbit does not know: it names nothing, and down_proj is bf16 on disk
    wrong = "model.text_model.layers.0.mlp.down_proj"
    plan = build(tmp_path, quantized_but(f"{L0}.mlp.down_proj", "lm_head"), modelopt("NVFP4", [wrong, "lm_head"]),
                 layout="vlm-new")
    text = problems(plan)
    assert f"{wrong}: exclude_modules entry '{wrong}' matches no module of this checkpoint" in text
    assert f"{L0}.mlp.down_proj: the config says W:nvfp4" in text and "holds unquantized bf16" in text
    # the same list in a layout lowbit maps resolves cleanly (vLLM #54547 matched none)
    ok = build(tmp_path / "ok", quantized_but(f"{L0}.mlp.down_proj", "lm_head"),
               modelopt("NVFP4", ["language_model.model.layers.0.mlp.down_proj", "language_model.lm_head"]),
               layout="vlm-new")
    assert not ok.problems, problems(ok)


def test_broken_quantized_layer_without_scale(tmp_path):
    edit = lambda t: t.pop(f"{L0}.mlp.down_proj.weight_scale")  # noqa: E731
    plan = build(tmp_path, quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"]), edit=edit)
    assert [p.layer for p in plan.problems] == [f"{L0}.mlp.down_proj"]
    msg = plan.problems[0].message
    assert f"missing tensor {L0}.mlp.down_proj.weight_scale (F32 [] or [1])" in msg
    assert "the config says W:fp8-tensor A:fp8-static-tensor (global quant_algo FP8)" in msg
    trusted = build(tmp_path / "t", quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"]), edit=edit,
                    trust=True)
    assert trusted.problems  # nothing to trust: no scheme stores an FP8 weight without its scale


def test_broken_extra_unexplained_tensor(tmp_path):
    def edit(t):
        t[f"{L0}.mlp.mystery.weight"] = ("BF16", (8, 8))
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head"]), edit=edit)
    assert [p.layer for p in plan.problems] == [f"{L0}.mlp.mystery"]
    assert f"unexplained tensor {L0}.mlp.mystery.weight (BF16 [8, 8])" in plan.problems[0].message


def test_broken_unexpected_tensor_on_a_projection(tmp_path):
    def edit(t):
        t[f"{L0}.mlp.down_proj.weight_g_idx"] = ("I32", (128,))
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head"]), edit=edit)
    assert [p.layer for p in plan.problems] == [f"{L0}.mlp.down_proj"]
    assert f"unexpected tensor {L0}.mlp.down_proj.weight_g_idx (I32 [128])" in plan.problems[0].message


def test_broken_tied_embeddings_with_quantized_head(tmp_path):
    def add_head(scheme):
        def edit(t):
            for role, spec in expected_tensors(scheme, 256, 64, False).items():
                t[f"lm_head.{role}"] = ("BF16" if spec.dtype == "float" else spec.dtype, spec.shape or ())
        return edit
    plan = build(tmp_path, lambda m: NVFP4, modelopt("NVFP4"), edit=add_head(NVFP4), tie_word_embeddings=True)
    assert [p.layer for p in plan.problems] == ["lm_head"]
    assert "tie_word_embeddings is true but the file holds a quantized lm_head" in plan.problems[0].message
    # a bf16 copy of the tied embedding is skipped, with the reason
    ok = build(tmp_path / "ok", lambda m: NVFP4, modelopt("NVFP4"), edit=add_head(BF16), tie_word_embeddings=True)
    assert not ok.problems and "duplicate of the tied embedding" in ok.skipped["lm_head.weight"]


def test_fused_layer_with_disagreeing_shards_runs_unfused(tmp_path):
    exclude = [f"{L0}.self_attn.v_proj", f"{L0}.mlp.up_proj", "lm_head"]
    plan = build(tmp_path, quantized_but(*exclude), modelopt("NVFP4", exclude))
    assert not plan.problems
    notes = "\n".join(plan.notes)
    assert f"{L0}.self_attn.qkv_proj: shards have different schemes (q_proj+k_proj: W:nvfp4-g16" in notes
    assert "v_proj: unquantized bf16): runs unfused, as 2 separate projections" in notes
    assert f"{L0}.mlp.gate_up_proj: shards have different schemes" in notes
    assert "model.layers.1.self_attn.qkv_proj" not in notes


# -- other cross-checks ------------------------------------------------------------------------------------

def test_stray_input_scale_on_weight_only_is_skipped_with_a_reason(tmp_path):
    def edit(t):
        t[f"{L0}.mlp.down_proj.input_scale"] = ("F32", ())
    plan = build(tmp_path, lambda m: W4A16_NVFP4, modelopt("W4A16_NVFP4"), edit=edit)
    assert not plan.problems
    assert "input_scale" not in plan.layers[f"{L0}.mlp.down_proj"].tensors  # the loader never sees it
    assert "stray input_scale" in plan.skipped[f"{L0}.mlp.down_proj.input_scale"]


def test_wrong_scale_shape_is_named(tmp_path):
    def edit(t):
        t[f"{L0}.mlp.up_proj.weight_scale"] = ("F8_E4M3", (128, 8))
    plan = build(tmp_path, quantized_but("lm_head"), modelopt("NVFP4", ["lm_head"]), edit=edit)
    assert f"tensor {L0}.mlp.up_proj.weight_scale: expected F8_E4M3 [128, 4], found F8_E4M3 [128, 8]" in problems(plan)


def test_missing_projection_and_both_layouts(tmp_path):
    plan = build(tmp_path, lambda m: BF16, edit=lambda t: t.pop(f"{L0}.self_attn.o_proj.weight"))
    assert f"{L0}.self_attn.o_proj: no tensors for this projection" in problems(plan)

    def both(t):
        t[f"{L0}.self_attn.qkv_proj.weight"] = ("BF16", (128, 64))
    plan = build(tmp_path / "both", lambda m: BF16, edit=both)
    assert "stored both fused" in problems(plan)


def test_missing_and_misshapen_parameters(tmp_path):
    def edit(t):
        t.pop("model.layers.1.input_layernorm.weight")
        t["model.norm.weight"] = ("BF16", (63,))
    text = problems(build(tmp_path, lambda m: BF16, edit=edit))
    assert "missing tensor model.layers.1.input_layernorm.weight" in text
    assert "tensor model.norm.weight: expected BF16/F16/F32 [64], found BF16 [63]" in text


def test_mxfp8_is_parsed_but_refused(tmp_path):
    plan = build(tmp_path, lambda m: modelopt_scheme("MXFP8"), modelopt("MXFP8"))
    assert plan.layers["lm_head"].scheme.weight == "mxfp8"
    assert "no MXFP8 kernels yet" in problems(plan)


# -- KV-cache scales -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["self_attn.{k}_proj.{k}_scale", "self_attn.{k}_scale", "self_attn.attn.{k}_scale"])
def test_kv_scale_spellings(tmp_path, spelling):
    def edit(t):
        for i in range(2):
            for k in "kv":
                t[f"model.layers.{i}." + spelling.format(k=k)] = ("F32", ())
    plan = build(tmp_path, quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"], kv_cache_quant_algo="FP8"),
                 edit=edit)
    assert not plan.problems and plan.kv_cache == "fp8"
    assert plan.kv_scales[f"{L0}.self_attn.v_scale"] == f"{L0}." + spelling.format(k="v")


def test_single_kv_scale_serves_both(tmp_path):
    def edit(t):
        for i in range(2):
            t[f"model.layers.{i}.self_attn.kv_scale"] = ("F32", (1,))
    plan = build(tmp_path, quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"], kv_cache_quant_algo="FP8"),
                 edit=edit)
    assert plan.kv_scales[f"{L0}.self_attn.k_scale"] == plan.kv_scales[f"{L0}.self_attn.v_scale"] == f"{L0}.self_attn.kv_scale"


def test_kv_cache_declared_without_scales(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"], kv_cache_quant_algo="FP8"))
    assert "model.layers.1.self_attn.v_scale: missing: the config declares an FP8 KV cache" in problems(plan)


def test_kv_scales_without_kv_config_are_a_note(tmp_path):
    plan = build(tmp_path, quantized_but("lm_head", scheme=FP8), modelopt("FP8", ["lm_head"]), kv=True)
    assert not plan.problems and plan.kv_cache is None and len(plan.kv_scales) == 4
    assert any("KV-cache scales on disk, but the config declares no quantized KV cache" in n for n in plan.notes)


# -- trusting the tensors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", [NVFP4, W4A16_NVFP4, FP8, CT_NVFP4, CT_W4A16,
                                    Scheme(weight="int8", granularity="group", group_size=32, packed=True,
                                           symmetric=False, fmt=CT),
                                    modelopt_scheme("FP8_PER_CHANNEL_PER_TOKEN")])
def test_no_config_but_quantized_tensors(tmp_path, scheme):
    plan = build(tmp_path, lambda m: scheme)
    assert len(plan.problems) == len(plan.layers)  # the config says bf16 for every projection
    trusted = build(tmp_path / "t", lambda m: scheme, trust=True)
    assert not trusted.problems, problems(trusted)
    assert all(lp.scheme == scheme for lp in trusted.layers.values())
    assert sum("override" in n for n in trusted.notes) == len(trusted.layers)


# -- the on-disk table (spec section 2), both spellings -------------------------------------------------------

N, K = 96, 256
TABLE = [
    (FP8, {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("F32", None), "input_scale": ("F32", None)}),
    (modelopt_scheme("FP8_PER_CHANNEL_PER_TOKEN"), {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("F32", (N,))}),
    (modelopt_scheme("FP8_PB_WO"), {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("F32", (1, 1, 2, 1))}),
    (NVFP4, {"weight": ("U8", (N, K // 2)), "weight_scale": ("F8_E4M3", (N, K // 16)), "weight_scale_2": ("F32", None),
             "input_scale": ("F32", None)}),
    (CT_NVFP4, {"weight_packed": ("U8", (N, K // 2)), "weight_scale": ("F8_E4M3", (N, K // 16)),
                "weight_global_scale": ("F32", None), "input_global_scale": ("F32", None)}),
    (Scheme(weight="int4", granularity="group", group_size=128, packed=True, fmt=CT),
     {"weight_packed": ("I32", (N, K * 4 // 32)), "weight_scale": ("float", (N, 2)), "weight_shape": ("I64", (2,))}),
    (Scheme(weight="int4", granularity="group", group_size=128, packed=True, symmetric=False, fmt=CT),
     {"weight_packed": ("I32", (N, 32)), "weight_scale": ("float", (N, 2)), "weight_shape": ("I64", (2,)),
      "weight_zero_point": ("I32", (N * 4 // 32, 2))}),
    (Scheme(weight="int8", granularity="channel", packed=True, fmt=CT),
     {"weight_packed": ("I32", (N, K // 4)), "weight_scale": ("float", (N, 1)), "weight_shape": ("I64", (2,))}),
    (Scheme(weight="int8", granularity="channel", activation="int8", act_dynamic=True, act_granularity="token", fmt=CT),
     {"weight": ("I8", (N, K)), "weight_scale": ("float", (N, 1))}),
    (Scheme(weight="int8", granularity="tensor", activation="int8", act_granularity="tensor", act_symmetric=False,
            fmt=CT),
     {"weight": ("I8", (N, K)), "weight_scale": ("float", None), "input_scale": ("float", None),
      "input_zero_point": ("I8", None)}),
    (Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True, act_granularity="token", fmt=CT),
     {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("float", (N, 1))}),
    (Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor", fmt=CT),
     {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("float", None), "input_scale": ("float", None)}),
    (Scheme(weight="fp8", granularity="block", block=(128, 128), fmt=CT),
     {"weight": ("F8_E4M3", (N, K)), "weight_scale": ("float", (1, 2))}),
    (BF16, {"weight": ("float", (N, K))}),
]


@pytest.mark.parametrize("scheme, want", TABLE, ids=lambda x: x.label() + "-" + str(x.fmt) if isinstance(x, Scheme) else "")
def test_expected_tensors_rows(scheme, want):
    got = {r: (s.dtype, s.shape) for r, s in expected_tensors(scheme, N, K, False).items() if not s.optional}
    assert got == want


def test_weight_only_nvfp4_tolerates_stray_activation_scales_and_bias_is_float():
    t = expected_tensors(W4A16_NVFP4, N, K, True)
    assert t["input_scale"].optional and t["bias"] == TensorSpec("float", (N,))
    assert expected_tensors(Scheme(weight="nvfp4", granularity="group", group_size=16, fmt=CT), N, K, False)[
        "input_global_scale"].optional


def test_check_tensor_accepts_both_scalar_spellings():
    spec = TensorSpec("F32", None)
    assert check_tensor(spec, "F32", ()) is None and check_tensor(spec, "F32", (1,)) is None
    assert check_tensor(spec, "F32", (2,)) == "expected F32 [] or [1], found F32 [2]"
    assert check_tensor(TensorSpec("float", (4, 4)), "F16", (4, 4)) is None
    assert "found I8" in check_tensor(TensorSpec("float", (4, 4)), "I8", (4, 4))
