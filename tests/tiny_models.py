"""Tiny random transformers models saved to disk, the reference implementation for lowbit's."""
from __future__ import annotations

import torch

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", cls="LlamaForCausalLM"),
    "mistral": dict(model_type="mistral", cls="MistralForCausalLM"),
    "qwen2": dict(model_type="qwen2", cls="Qwen2ForCausalLM"),
    "qwen3": dict(model_type="qwen3", cls="Qwen3ForCausalLM"),
    "phi3": dict(model_type="phi3", cls="Phi3ForCausalLM"),
}


def make_tiny(path, arch: str = "llama", tie: bool = False, dtype=torch.float32, **overrides):
    """Build a random-initialized transformers model of `arch`, save it to `path`, return the HF model."""
    import transformers

    info = ARCH_CONFIGS[arch]
    cfg_cls = transformers.AutoConfig.for_model(info["model_type"]).__class__
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every run
    model = getattr(transformers, info["cls"])(cfg).to(dtype).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb so they matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model
