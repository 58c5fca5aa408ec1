"""One generic test every model family passes (issue 11): a tiny transformers model of the family is
built on the fly with fresh random weights, and lowbit must
  1. give transformers' fp32 logits (relative L2 <= 1e-5);
  2. decode through its caches (prefill part of the prompt, then one forced token per step) with
     the logits of the cache-less full forward;
  3. on a GPU, decode the same greedy tokens with CUDA graphs as without.
A family's entry gives its transformers class and config; prompts are longer than any sliding window.
"""
from __future__ import annotations

import pytest
import torch

import lowbit
from conftest import requires_cuda

NEMOTRON = dict(head_dim=16, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=12, n_groups=2, chunk_size=4,
                layer_norm_epsilon=1e-5)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", {}),
    "mistral-sliding": ("MistralForCausalLM", "mistral", dict(sliding_window=5)),
    "qwen2-sliding": ("Qwen2ForCausalLM", "qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "phi3", {}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32, norm_topk_prob=True,
                                                           num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3-moe-unnormalized": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(head_dim=16, num_experts=6,
                                                                        num_experts_per_tok=3,
                                                                        moe_intermediate_size=32,
                                                                        norm_topk_prob=False,
                                                                        decoder_sparse_step=2)),
    "mixtral-sliding": ("MixtralForCausalLM", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                                              sliding_window=6)),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                                         layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"],
                                                         num_hidden_layers=3, final_logit_softcapping=30.0,
                                                         tie_word_embeddings=True,
                                                         rope_parameters={"full_attention": {"rope_type": "linear",
                                                                                             "factor": 2.0,
                                                                                             "rope_theta": 1e6},
                                                                          "sliding_attention": {"rope_type": "default",
                                                                                                "rope_theta": 1e4}})),
    # Qwen3.5: Gated DeltaNet + gated full attention (transformers' torch fallback for the linear layers)
    "qwen3_5": ("Qwen3_5ForCausalLM", "qwen3_5_text", dict(
        head_dim=16, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_conv_kernel_dim=4, partial_rotary_factor=0.5)),
    "qwen3_5-moe": ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", dict(
        head_dim=16, num_hidden_layers=2, full_attention_interval=2, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)),
    # Nemotron-H: Mamba2 (M), attention without rotary (*), relu^2 MLP (-), MoE (E); chunk 4 < PROMPT
    "nemotron-h": ("NemotronHForCausalLM", "nemotron_h", dict(NEMOTRON, hybrid_override_pattern="M*M-")),
    "nemotron-h-moe": ("NemotronHForCausalLM", "nemotron_h", dict(
        NEMOTRON, layers_block_type=["linear_attention", "moe", "full_attention", "moe"], n_routed_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "nemotron-h-moe-latent": ("NemotronHForCausalLM", "nemotron_h", dict(
        NEMOTRON, layers_block_type=["moe", "linear_attention", "full_attention"], n_routed_experts=4,
        num_experts_per_tok=3, moe_intermediate_size=32, moe_shared_expert_intermediate_size=40,
        moe_latent_size=24, norm_topk_prob=False)),
}
PROMPT = 13  # tokens; longer than every sliding window above


def make_family_model(path, key: str, dtype=torch.float32):
    import transformers

    cls, model_type, extra = FAMILIES[key]
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(extra)
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every run
    model = getattr(transformers, cls)(cfg).to(dtype).eval()
    with torch.no_grad():  # default init leaves norms at 1 (or 0) and biases at 0: perturb so they matter
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():  # Nemotron-H's router correction bias starts at 0 too
            if n.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    for m in model.modules():  # transformers 5.24's Mamba2 prefill clamps dt to (time_step_min, inf), not to
        if hasattr(m, "time_step_limit"):  # the config's time_step_limit (docs/kernels-mamba2.md): use the config's
            m.time_step_limit = tuple(cfg.time_step_limit)
    model.save_pretrained(path, safe_serialization=True)
    return model


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def cached_logits(model, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits of positions prefill-1 .. len-1 through the engine: prefill, then forced decode steps."""
    from lowbit.sampling import SamplingParams

    engine = model.engine(1, len(ids) + 2, cuda_graphs=False)
    slot = engine.acquire()
    try:
        out = []
        engine.prefill(slot, ids[:prefill], SamplingParams())
        out.append(model.logits(torch.tensor([ids[:prefill]]))[0, -1])  # the prefill's own last row
        sl = torch.tensor([slot], device=model.device)
        for t in range(prefill, len(ids)):
            engine.tokens[slot] = ids[t]
            engine.lengths[slot] += 1
            out.append(engine._decode_logits(sl)[0])
            engine.positions[slot] += 1
        return torch.stack(out)
    finally:
        engine.release(slot)


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_family_matches_transformers_and_its_cache(tmp_path, key):
    hf = make_family_model(tmp_path, key)
    ids = torch.randint(3, 320, (2, PROMPT))
    with torch.no_grad():
        want = hf(ids).logits
    model = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False)
    got = model.logits(ids)
    assert rel(got, want) < 1e-5, f"{key}: fp32 logits differ from transformers by {rel(got, want):.3g}"
    seq = ids[0].tolist()
    dec = cached_logits(model, seq, prefill=4)
    assert rel(dec, got[0, 3:]) < 1e-5, f"{key}: cached decode differs from the full forward"


@requires_cuda
@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_family_cuda_graph_decode_equals_eager(tmp_path, key):
    make_family_model(tmp_path, key)
    model = lowbit.load(tmp_path, device="cuda", dtype="bfloat16", progress=False)
    prompts = [torch.randint(3, 320, (PROMPT + i,)).tolist() for i in range(3)]
    model.engine(4, 64, cuda_graphs=True)
    graphs = [r.output_ids for r in model.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    model.engine(4, 64, cuda_graphs=False)
    eager = [r.output_ids for r in model.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    assert graphs == eager


def test_nemotron_h_layer_kinds_and_refusals():
    """Layer kinds from hybrid_override_pattern (older configs) or layers_block_type (incl. the legacy
    kind names); config fields lowbit does not implement are refused by name."""
    from lowbit.config import parse_model_config
    from lowbit.errors import ConfigError

    base = dict(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=64, hidden_size=32,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48, mamba_num_heads=4,
                mamba_head_dim=8, ssm_state_size=8, n_groups=2, time_step_limit=[0.0, {"__float__": "Infinity"}])
    cfg = parse_model_config(dict(base, hybrid_override_pattern="M*-E", n_routed_experts=4))
    assert cfg.layer_types == ["linear_attention", "full_attention", "mlp", "moe"] and cfg.num_layers == 4
    assert cfg.mamba.time_step_limit == (0.0, float("inf"))
    legacy = parse_model_config(dict(base, layers_block_type=["mamba", "attention", "mlp"]))
    assert legacy.layer_types == ["linear_attention", "full_attention", "mlp"]
    for bad, field in ((dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern"),
                       (dict(layers_block_type=["mamba", "attention"], residual_in_fp32=True), "residual_in_fp32"),
                       (dict(layers_block_type=["attention"], attention_bias=True), "attention_bias"),
                       (dict(layers_block_type=["mamba"], use_bias=True), "use_bias"),
                       (dict(layers_block_type=["moe"], n_routed_experts=6, n_group=4), "n_group")):
        with pytest.raises(ConfigError, match=field):
            parse_model_config(dict(base, **bad))
