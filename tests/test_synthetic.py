"""Issue 6: synthetic models. Each scheme is built through the scheme units from encoded random
weights: the stored weights decode back to the drawn ones within the format's precision, and a
quantized model takes no more memory than its on-disk bytes (x1.15)."""
from __future__ import annotations

import random

import pytest
import torch

from lowbit import synthetic
from lowbit.errors import ConfigError

# relative L2 error of the decoded weight against the drawn bf16 one (RTN of N(0, 0.02) weights)
PRECISION = {"bf16": 0.0, "fp8": 0.04, "fp8-channel": 0.04, "nvfp4": 0.15, "w4a16-nvfp4": 0.15, "int4-g128": 0.15,
             "int8-w8a8": 0.01, "w4a16-g64-asym": 0.12}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme", list(PRECISION))
def test_synthetic_scheme(scheme):
    seed = random.randrange(2**31)
    m = synthetic.build("tiny", scheme, lm_head_quant=True, device="cpu", seed=seed)
    want = synthetic.parse_scheme(scheme)
    for name, group in [(n, g) for n, g in m.net.named_modules() if hasattr(g, "parts")]:
        (layer,) = group.parts  # all shards share the scheme: one fused layer
        assert layer.method.scheme == want, name
        shards = m.plan.slots[[s.fused_name for s in m.plan.slots].index(name)].shards
        drawn = torch.cat([synthetic._randn((n, layer.spec.in_features), s, seed, "cpu", synthetic.WEIGHT_STD)
                           for s, n in zip(shards, layer.spec.shard_sizes)])
        err = rel_err(layer.method.dequantize(layer), drawn)
        assert err <= PRECISION[scheme] and (err > 0) == want.quantized, (name, err)
    assert m.weight_bytes() <= 1.15 * m.report.bytes_read
    assert torch.isfinite(m.logits(torch.randint(0, 512, (1, 9)))).all()


def test_same_seed_same_model_and_head_left_bf16():
    seed = random.randrange(2**31)
    a = synthetic.build("tiny", "int4-g128", device="cpu", seed=seed)
    b = synthetic.build("tiny", "int4-g128", device="cpu", seed=seed)
    c = synthetic.build("tiny", "int4-g128", device="cpu", seed=seed + 1)
    pa, pb, pc = (m.net.model.layers[1].mlp.down_proj.parts[0].weight_packed for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.net.lm_head.parts[0].method.scheme.weight == "bf16"  # no --lm-head-quant


def test_real_shapes_are_described():
    cfg = synthetic.model_config("llama-3-8b")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == \
        (4096, 14336, 32, 128256)
    assert synthetic.model_config("qwen3-8b")["head_dim"] == 128
    assert synthetic.model_config("llama-3-70b-layer")["hidden_size"] == 8192


def test_unknown_names():
    with pytest.raises(ConfigError, match="unknown --scheme 'int3'.*int4-g128"):
        synthetic.build("tiny", "int3", device="cpu")
    with pytest.raises(ConfigError, match="unknown --synthetic model 'gpt2'.*llama-3-8b"):
        synthetic.build("gpt2", device="cpu")
