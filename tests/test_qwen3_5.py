"""Qwen3.5 checkpoints as released (issue 12), built from the fixtures: the MTP head's `mtp.*` tensors
are reported skipped with their reason (never an unexplained tensor, never silently dropped), and a
W4A16_NVFP4 label over tensors that carry input scales loads weight-only and says why."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from conftest import fixture_dir
from lowbit.checkpoint import Checkpoint
from lowbit.models.qwen3_5 import MTP_REASON
from lowbit.quant.resolve import resolve

MTP = {"mtp.fc.weight": (256, 512), "mtp.layers.0.input_layernorm.weight": (256,), "mtp.norm.weight": (256,)}


def relabelled_w4a16_with_mtp(src, dst):
    """modelopt-nvfp4-qwen3_5 relabelled W4A16_NVFP4 (its input_scale tensors stay), plus MTP tensors."""
    shutil.copytree(src, dst)
    hq = json.loads((dst / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "W4A16_NVFP4"
    (dst / "hf_quant_config.json").write_text(json.dumps(hq))
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["quant_algo"] = "W4A16_NVFP4"
    for g in qc["config_groups"].values():
        g["input_activations"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(dst / "model.safetensors")
    tensors |= {n: torch.randn(s).to(torch.bfloat16) for n, s in MTP.items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_mtp_skipped_and_stray_input_scales_ignored_on_w4a16(tmp_path):
    src = fixture_dir("modelopt-nvfp4-qwen3_5")
    if not src.exists():
        pytest.skip("no fixtures")
    relabelled_w4a16_with_mtp(src, tmp_path / "ckpt")
    plan = resolve(Checkpoint(tmp_path / "ckpt"))
    assert not plan.problems, "\n".join(map(str, plan.problems))
    assert all(plan.skipped[n] == MTP_REASON for n in MTP)
    stray = [n for n in plan.skipped if n.endswith(".input_scale")]
    assert stray and all("weight-only" in plan.skipped[n] for n in stray)
    qkv = plan.layers["model.layers.0.linear_attn.in_proj_qkv"]
    assert (qkv.scheme.algo, qkv.scheme.activation) == ("W4A16_NVFP4", "none")
    assert any("input_scale" in n and "weight-only" in n for n in qkv.notes)  # what inspect prints per layer
    model = lowbit.load(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16, progress=False)
    assert all(model.report.skipped[n] == MTP_REASON for n in MTP)
    ids = torch.arange(1, 9)[None]
    assert torch.isfinite(model.logits(ids)).all()


def test_tensor_parallel_splits_heads_or_names_the_field():
    from lowbit.config import parse_model_config
    from lowbit.errors import ConfigError
    from lowbit.models import family

    src = fixture_dir("base-qwen3_5-bf16")
    if not src.exists():
        pytest.skip("no fixtures")
    cfg = parse_model_config(json.loads((src / "config.json").read_text()))
    family(cfg).check_tp(cfg, 2)  # 2 key / 4 value heads split in two (tests/test_tp.py runs it)
    with pytest.raises(ConfigError, match="linear_num_key_heads 2 is not a multiple of tp=4"):
        family(cfg).check_tp(cfg, 4)
