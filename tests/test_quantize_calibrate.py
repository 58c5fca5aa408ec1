"""Calibration: the layer-by-layer forward records the same Linear input amax as the whole
transformers model does, and the written activation scales are those amax in each producer's
convention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.checkpoint import Checkpoint
from lowbit.errors import LowbitError
from lowbit.names import to_canonical
from lowbit.quantize import quantize
from lowbit.quantize.calibrate import LayerwiseCalibrator, calibration_tokens
from test_quantize_output import _tokenizer
from tiny_models import make_tiny


@pytest.fixture(params=["llama", "phi3", "qwen2"])
def model_dir(request, tmp_path):
    path = tmp_path / request.param
    model = make_tiny(path, request.param, dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
    _tokenizer(path)
    return path, model


def _full_model_amax(model, tokens):
    amax, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def record(_m, args, name=name):
                a = args[0].abs().amax().float()
                amax[name] = torch.maximum(amax.get(name, a), a)
            hooks.append(m.register_forward_pre_hook(record))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for row in tokens.split(2):
            model(row)
    for h in hooks:
        h.remove()
    return amax


def test_layerwise_amax_equals_whole_model(model_dir):
    path, model = model_dir
    tokens = torch.randint(3, 300, (4, 48))
    ckpt = Checkpoint(path)
    disk = {to_canonical(n): n for n in ckpt.tensors}
    read = lambda c: ckpt.read(disk[c])  # noqa: E731
    calib = LayerwiseCalibrator(path, tokens, read, torch.device("cpu"), torch.bfloat16)
    ours = {}
    for i in range(model.config.num_hidden_layers):
        ours.update(calib.layer(i, read))
    ours["lm_head"] = calib.head_input_amax(read)
    ref = _full_model_amax(model, tokens)
    assert sorted(ours) == sorted(ref)
    for name, a in ours.items():
        assert torch.isclose(a.float(), ref[name], rtol=0.02), f"{name}: {a.item()} vs {ref[name].item()}"


def test_written_activation_scales_use_the_calibrated_amax(model_dir, tmp_path):
    path, _ = model_dir
    for fmt in ("modelopt", "compressed-tensors"):
        out = tmp_path / fmt
        quantize(path, out, "fp8", fmt, lm_head=True, calib_samples=3, calib_seq_len=32)
        ckpt = Checkpoint(out)
        scales = {n: ckpt.read(n).float().reshape(()) for n in ckpt.tensors if n.endswith("input_scale")}
        assert len(scales) == sum(n.endswith(".weight_scale") for n in ckpt.tensors) > 0
        # layer inputs are RMS-normed activations of magnitude ~1-10: amax/448 lies in [1e-4, 0.1]
        assert all(1e-4 < s < 0.1 for s in scales.values()), scales
        # q/k/v (and gate/up) read the same input: one value
        qkv = [s for n, s in scales.items() if "layers.0.self_attn" in n and "o_proj" not in n]
        assert len({s.item() for s in qkv}) == 1


def test_calibration_tokens(tmp_path):
    src = tmp_path / "tok"
    _tokenizer(src)
    t = calibration_tokens(src, None, samples=3, seq_len=50)
    assert t.shape == (3, 50) and t.dtype == torch.long
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    one = calibration_tokens(src, short, samples=8, seq_len=512)
    assert one.shape[0] == 1 and 3 < one.shape[1] < 20  # the whole text as one short row
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(LowbitError, match="is empty"):
        calibration_tokens(src, tmp_path / "empty.txt", 8, 512)
    with pytest.raises(LowbitError, match="no usable tokenizer"):
        calibration_tokens(tmp_path / "no-tokenizer-here", None, 8, 512)
