"""Every fixture in ../shared/fixtures resolves to the schemes its README and config describe.

The expectations below are written from each folder's README (producer call, which layers were left
unquantized) and its quantization config, not from lowbit's output."""
from __future__ import annotations

import pytest

from conftest import all_fixture_names, fixture_dir
from lowbit.checkpoint import Checkpoint
from lowbit.quant.resolve import resolve
from lowbit.quant.scheme import Scheme

CT, MO = "compressed-tensors", "modelopt"
BF16 = Scheme(weight="bf16")
# ModelOpt quant_algo -> docs/schemes.md
MO_FP8 = Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor", fmt=MO, algo="FP8")
MO_NVFP4 = Scheme(weight="nvfp4", granularity="group", group_size=16, activation="nvfp4", act_granularity="group",
                  fmt=MO, algo="NVFP4")
MO_W4A16_NVFP4 = Scheme(weight="nvfp4", granularity="group", group_size=16, fmt=MO, algo="W4A16_NVFP4")
# llm-compressor presets (scheme= in each README's recipe) -> docs/schemes.md
CT_FP8_DYNAMIC = Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                        act_granularity="token", fmt=CT)
CT_NVFP4 = Scheme(weight="nvfp4", granularity="group", group_size=16, activation="nvfp4", act_granularity="group",
                  fmt=CT)
CT_NVFP4A16 = Scheme(weight="nvfp4", granularity="group", group_size=16, fmt=CT)
CT_W4A16 = Scheme(weight="int4", granularity="group", group_size=128, packed=True, fmt=CT)
CT_W8A16 = Scheme(weight="int8", granularity="group", group_size=128, packed=True, fmt=CT)
CT_W8A8 = Scheme(weight="int8", granularity="channel", activation="int8", act_dynamic=True, act_granularity="token",
                 fmt=CT)


def same(s, head=BF16, **kw):
    return dict(attn=s, mlp=s, head=head, **kw)


EXPECT = {
    "base-llama-bf16": same(BF16),
    "base-phi3-bf16": same(BF16, fused=True),
    "llmcompressor-fp8_dynamic": same(CT_FP8_DYNAMIC),
    "llmcompressor-fp8_dynamic-lmhead": same(CT_FP8_DYNAMIC, head=CT_FP8_DYNAMIC),
    "llmcompressor-nvfp4": same(CT_NVFP4),
    "llmcompressor-nvfp4-lmhead": same(CT_NVFP4, head=CT_NVFP4),
    "llmcompressor-nvfp4-phi3": same(CT_NVFP4, fused=True),
    "llmcompressor-nvfp4-vlm-old": same(CT_NVFP4, layout="vlm-old"),
    "llmcompressor-nvfp4a16": same(CT_NVFP4A16),
    "llmcompressor-nvfp4a16-lmhead": same(CT_NVFP4A16, head=CT_NVFP4A16),
    "llmcompressor-w4a16": same(CT_W4A16),
    "llmcompressor-w4a16-lmhead": same(CT_W4A16, head=CT_W4A16),
    "llmcompressor-w8a16": same(CT_W8A16),
    "llmcompressor-w8a16-lmhead": same(CT_W8A16, head=CT_W8A16),
    "llmcompressor-w8a8": same(CT_W8A8),
    "llmcompressor-w8a8-lmhead": same(CT_W8A8, head=CT_W8A8),
    "modelopt-fp8": same(MO_FP8),
    "modelopt-fp8-kvfp8": same(MO_FP8, kv="fp8"),
    "modelopt-fp8-lmhead": same(MO_FP8, head=MO_FP8),
    "modelopt-fp8-phi3": same(MO_FP8, fused=True),
    "modelopt-mixed": dict(attn=MO_FP8, mlp=MO_NVFP4, head=BF16),  # quantized_layers: attention FP8, MLP NVFP4
    "modelopt-mixed-lmhead": dict(attn=MO_FP8, mlp=MO_NVFP4, head=MO_NVFP4),
    "modelopt-nvfp4": same(MO_NVFP4),
    "modelopt-nvfp4-fused": same(MO_NVFP4, fused=True),
    "modelopt-nvfp4-lmhead": same(MO_NVFP4, head=MO_NVFP4),
    "modelopt-nvfp4-phi3": same(MO_NVFP4, fused=True),
    "modelopt-nvfp4-vlm-new": same(MO_NVFP4, layout="vlm-new"),
    "modelopt-nvfp4-vlm-old": same(MO_NVFP4, layout="vlm-old"),
    "modelopt-w4a16_nvfp4": same(MO_W4A16_NVFP4),
    "modelopt-w4a16_nvfp4-lmhead": same(MO_W4A16_NVFP4, head=MO_W4A16_NVFP4),
    "base-mistral-bf16": same(BF16),
    "base-gemma3-bf16": same(BF16, head=None),  # tie_word_embeddings: no lm_head
    "llmcompressor-w8a8-gemma3": same(CT_W8A8, head=None),
    # Qwen3-MoE: 4 experts per layer stored per expert; routers (mlp.gate) excluded and bf16
    "base-qwen3moe-bf16": same(BF16, experts=4),
    "llmcompressor-w4a16-qwen3moe": same(CT_W4A16, experts=4),
    "modelopt-nvfp4-qwen3moe": same(MO_NVFP4, experts=4),
    # Qwen3.5: 4 layers, linear_attention x3 then full_attention (base README). `linear`: the scheme of
    # in_proj_qkv/in_proj_z/out_proj; in_proj_a/in_proj_b are bf16 in every export (ModelOpt's
    # exclude_modules lists them; the llm-compressor recipe ignores 're:.*linear_attn.*' altogether)
    "base-qwen3_5-bf16": same(BF16, linear=BF16),
    "llmcompressor-nvfp4-qwen3_5": same(CT_NVFP4, linear=BF16),
    "modelopt-nvfp4-qwen3_5": same(MO_NVFP4, linear=MO_NVFP4),
    "modelopt-nvfp4-qwen3_5-vlm": same(MO_NVFP4, linear=MO_NVFP4, layout="vlm-new"),  # + model.visual.* skipped
    # Nemotron-H, pattern M*M- (README): Mamba2 in_proj/out_proj, attention and MLP are all "Linear"
    "base-nemotronh-bf16": same(BF16, nemotronh=True, layout="backbone"),
    "llmcompressor-w4a16-nemotronh": same(CT_W4A16, nemotronh=True, layout="backbone"),  # lm_head ignored
    "modelopt-nvfp4-lmhead-nemotronh": same(MO_NVFP4, head=MO_NVFP4, nemotronh=True, layout="backbone"),
}
# Fixtures of families lowbit does not run yet: they must be refused with an error naming the
# architecture (never half-loaded). Each moves to EXPECT when its family lands.
PENDING = {
}
# on-disk spelling of model.* and of lm_head per layout (each README's "How it was made")
LAYOUTS = {"text": ("model.", "lm_head."), "vlm-new": ("model.language_model.", "lm_head."),
           "vlm-old": ("language_model.model.", "language_model.lm_head."), "backbone": ("backbone.", "lm_head.")}


def test_every_fixture_has_expectations():
    names = all_fixture_names()
    if not names:
        pytest.skip("no fixtures found")
    assert set(names) == set(EXPECT) | set(PENDING), "a new fixture needs its expectations written here"


@pytest.mark.parametrize("name", sorted(PENDING))
def test_fixtures_of_families_not_yet_run_are_refused_by_name(name):
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"unsupported architecture {PENDING[name]}"):
        resolve(Checkpoint(fixture_dir(name)))


def expected_layers(exp: dict) -> dict[str, Scheme]:
    attn = ("qkv_proj", "o_proj") if exp.get("fused") else ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp = ("gate_up_proj", "down_proj") if exp.get("fused") else ("gate_proj", "up_proj", "down_proj")
    out = {} if exp["head"] is None else {"lm_head": exp["head"]}
    if exp.get("nemotronh"):  # layers M * M -: every mixer's projections sit under `mixer`
        mixers = {0: ("in_proj", "out_proj"), 1: ("q_proj", "k_proj", "v_proj", "o_proj"), 2: ("in_proj", "out_proj"),
                  3: ("up_proj", "down_proj")}
        return out | {f"model.layers.{i}.mixer.{p}": exp["attn"] for i, ps in mixers.items() for p in ps}
    hybrid = "linear" in exp  # Qwen3.5: layers 0-2 Gated DeltaNet, layer 3 full attention
    for i in range(4 if hybrid else 2):  # every other fixture model has 2 decoder layers (fixtures README)
        if hybrid and i < 3:
            out |= {f"model.layers.{i}.linear_attn.{p}": exp["linear"]
                    for p in ("in_proj_qkv", "in_proj_z", "out_proj")}
            out |= {f"model.layers.{i}.linear_attn.{p}": BF16 for p in ("in_proj_a", "in_proj_b")}
        else:
            out |= {f"model.layers.{i}.self_attn.{p}": exp["attn"] for p in attn}
        if exp.get("experts"):
            out |= {f"model.layers.{i}.mlp.experts.{e}.{p}": exp["mlp"] for e in range(exp["experts"])
                    for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            out |= {f"model.layers.{i}.mlp.{p}": exp["mlp"] for p in mlp}
    return out


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_fixture_resolves_as_documented(name):
    exp = EXPECT[name]
    ckpt = Checkpoint(fixture_dir(name))
    plan = resolve(ckpt)
    assert not plan.problems, "\n".join(map(str, plan.problems))
    assert {n: lp.scheme for n, lp in plan.layers.items()} == expected_layers(exp)
    assert plan.kv_cache == exp.get("kv") and len(plan.kv_scales) == (4 if exp.get("kv") else 0)

    # every tensor on disk has exactly one consumer (or a reason to be skipped)
    used = [t for lp in plan.layers.values() for t in lp.tensors.values()]
    used += list(plan.params.values()) + list(plan.kv_scales.values()) + list(plan.skipped)
    assert sorted(used) == sorted(ckpt.tensors)

    body, head = LAYOUTS[exp.get("layout", "text")]
    for lp in plan.layers.values():
        assert all(t.startswith(head if lp.name == "lm_head" else body) for t in lp.tensors.values())
        if exp.get("fused") and lp.name != "lm_head":  # Phi-3: fused on disk, one module, one scale set
            assert lp.shard is None
    for slot in plan.slots:
        assert len(plan.slot_parts(slot)) == 1  # no fixture mixes schemes within a fused projection


def test_modelopt_sentinel_exclude_entries_are_notes_not_problems():
    """ModelOpt 0.47's Nemotron-H export writes exclude entries with a NUL-byte name sentinel
    (README); they match nothing, and resolve says so in a note for each of the three."""
    plan = resolve(Checkpoint(fixture_dir("modelopt-nvfp4-lmhead-nemotronh")))
    assert not plan.problems
    corrupted = [n for n in plan.notes if "is corrupted" in n and "matches no module" in n]
    assert len(corrupted) == 3 and any("backbone.embeddings.\\x00backbone.pt_name_sentinel" in n for n in corrupted)


@pytest.mark.parametrize("name", [n for n, e in EXPECT.items() if e["head"] not in (BF16, None) and n.startswith("llmcompressor")])
def test_llmcompressor_linear_target_covers_the_head_it_quantized(name):
    """The READMEs: recipe targets="Linear", ignore=[] -> lm_head quantized. lowbit's reading of "Linear" leaves
    the head out (spec section 3); the tensors settle it, and the note says why."""
    plan = resolve(Checkpoint(fixture_dir(name)))
    assert any(n.startswith("lm_head:") and "llm-compressor" in n for n in plan.notes)


def test_fixture_reasons_name_the_config_entry():
    plan = resolve(Checkpoint(fixture_dir("modelopt-nvfp4-vlm-old")))
    assert plan.layers["lm_head"].reason == "excluded by exclude_modules entry 'language_model.lm_head'"
    plan = resolve(Checkpoint(fixture_dir("modelopt-mixed-lmhead")))
    assert plan.layers["lm_head"].reason == "quantized_layers['lm_head']"
    assert plan.layers["model.layers.1.mlp.down_proj"].reason == "quantized_layers['model.layers.1.mlp.down_proj']"
