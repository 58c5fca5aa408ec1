"""Random-weight models with real shapes, in any scheme, built in memory (`--synthetic NAME --scheme S`).

Each projection is drawn in bf16 one slot at a time on the target device, encoded into its on-disk
tensors by `lowbit.quantize.rtn` (the producers' own bytes), and handed to the scheme unit through
the same `Target.write` path the checkpoint loader uses; so a synthetic model runs exactly the code
a real checkpoint runs, and no bf16 copy of the whole model ever exists. Under tensor parallelism
every rank draws the same full tensors (seeded by name) and keeps its slice.

MTP (`speculative="mtp"`, Qwen3.5 configs: one MTP layer, as the releases have): random MTP weights
draft tokens the main model almost never agrees with (acceptance ~0). `mtp_agree=True` draws them to
agree instead (AGREEMENT below says how), so a benchmark sees the speed of accepted drafts.
"""
from __future__ import annotations

import zlib

import torch

from . import parallel
from .config import parse_model_config
from .errors import ConfigError
from .loader import LoadReport, build_model, finish_loading, write_param
from .model import Model, resolve_device
from .models import family
from .models.slots import ExpertSlot
from .quant.base import RunOptions
from .quant.numerics import FP8_MAX
from .quant.resolve import LayerPlan, QuantPlan, enable_speculative, expected_params
from .quant.scheme import Scheme, unquantized
from .quantize import rtn
from .quantize.recipes import preset

AGREEMENT = ("MTP weights drawn to agree: every output projection (o_proj, out_proj, down_proj, experts' "
             "down_proj; main model and MTP layer) scaled by {scale:g}, so the residual stream is the token's "
             "embedding; lm_head rows are the embedding rows permuted (lm_head[perm(t)] = embed[t]), so the "
             "greedy next token of t is perm(t); mtp.fc = [identity | 0] passes the next token's normed "
             "embedding and drops the hidden state, so the head predicts perm(next token), the main model's "
             "next-next token")
AGREE_SCALE = 1e-5
OUTPUT_PROJECTIONS = (".o_proj", ".out_proj", ".down_proj")

_LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
               eos_token_id=128001, rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})
CONFIGS = {
    "llama-3-8b": _LLAMA3,
    # two decoder layers of Llama-3-70B's shapes, with its embedding and head
    "llama-3-70b-layer": _LLAMA3 | dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
                                        num_attention_heads=64),
    # Qwen3-30B-A3B: 48 layers of 128 experts (top 8, intermediate 768 each), 32 q / 4 kv heads
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                          rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    # Qwen3.5-27B: 64 layers, linear:full attention 3:1, gated attention 24 q / 4 kv heads of 256
    "qwen3.5-27b": dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", vocab_size=248320,
                        hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                        num_key_value_heads=4, head_dim=256, full_attention_interval=4, linear_num_key_heads=16,
                        linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
                        linear_conv_kernel_dim=4, partial_rotary_factor=0.25, max_position_embeddings=262144,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        mtp_num_hidden_layers=1, rope_parameters={"rope_theta": 10000000.0, "rope_type": "default"}),
    # Qwen3.5-27B's sizes as an attention-only Llama (every layer full attention, plain MLP): the
    # baseline its prefill is measured against
    "llama-27b": _LLAMA3 | dict(vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
                                num_attention_heads=24, num_key_value_heads=4, head_dim=256,
                                max_position_embeddings=262144),
    # Qwen3.5-35B-A3B: 40 layers of 256 experts (top 8, intermediate 512) + a shared expert
    "qwen3.5-35b-a3b": dict(architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text",
                            vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                            num_key_value_heads=2, head_dim=256, full_attention_interval=4, linear_num_key_heads=16,
                            linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                            linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            partial_rotary_factor=0.25, max_position_embeddings=262144, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, mtp_num_hidden_layers=1,
                            rope_parameters={"rope_theta": 10000000.0, "rope_type": "default"}),
    # Nemotron-H-8B: 52 layers (24 Mamba2, 4 attention, 24 relu^2 MLP), Mamba 128 heads x 64, state 128, 8 groups
    "nemotron-h-8b": dict(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=131072,
                          hidden_size=4096, intermediate_size=21504, num_hidden_layers=52,
                          hybrid_override_pattern="M-M-M-M*-" * 4 + "M-" * 8, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, mamba_num_heads=128, mamba_head_dim=64,
                          ssm_state_size=128, n_groups=8, conv_kernel=4, expand=2, chunk_size=128,
                          mlp_hidden_act="relu2", layer_norm_epsilon=1e-5, max_position_embeddings=8192,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                          time_step_limit=[0.0, float("inf")], mamba_ssm_cache_dtype="float32"),
    # for CPU tests of the MoE path
    "tiny-moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=512, hidden_size=256,
                     intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=151643, eos_token_id=151645, rope_parameters={"rope_theta": 1000000.0,
                                                                                "rope_type": "default"}),
    # for GPU tests: big enough for the kernels' real tiling, small enough to build in a second
    "small": _LLAMA3 | dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                            num_attention_heads=16, num_key_value_heads=4),
    # for CPU tests: every K a multiple of 128 per rank at tp=2 (int4 groups of 128)
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=256,
                 intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
}

# --scheme names of the issue -> (quantize preset, on-disk format); any other preset name of
# `lowbit quantize` (w4a16-g64-asym, w8a16, nvfp4a16, ...) works too, in its first format.
SCHEMES = {
    "fp8": ("fp8", "modelopt"),  # per-tensor weights, static per-tensor activations
    "fp8-channel": ("fp8-dynamic", "modelopt"),  # FP8_PER_CHANNEL_PER_TOKEN
    "nvfp4": ("nvfp4", "modelopt"),  # W4A4 on disk; runs weight-only on Hopper
    "w4a16-nvfp4": ("nvfp4a16", "modelopt"),
    "int4-g128": ("w4a16-g128", "compressed-tensors"),
    "int8-w8a8": ("w8a8", "compressed-tensors"),
}
WEIGHT_STD = 0.02  # transformers' initializer_range
# Static activation scales (FP8 input_scale, NVFP4 input global scale, FP8 KV scales) need a
# calibrated amax; synthetic activations are taken to lie within +-8.
ASSUMED_AMAX = 8.0


def scheme_names() -> list[str]:
    return ["bf16"] + list(SCHEMES)


def parse_scheme(name: str) -> Scheme:
    if name in ("bf16", "fp16", "fp32"):
        return unquantized(name)
    preset_name, fmt = SCHEMES.get(name, (name, None))
    try:
        p = preset(preset_name)
    except ConfigError:
        raise ConfigError(f"unknown --scheme {name!r}; use one of {', '.join(scheme_names())} or a "
                          f"`lowbit quantize` preset (w4a16-g64, w8a16-channel, nvfp4a16, ...)") from None
    return p.scheme(fmt or p.formats()[0])


def model_config(name: str, overrides: dict | None = None) -> dict:
    if name not in CONFIGS:
        raise ConfigError(f"unknown --synthetic model {name!r}; use one of {', '.join(CONFIGS)}")
    return CONFIGS[name] | (overrides or {})


def _randn(shape, name: str, seed: int, device, std: float) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)


def _plan(cfg, scheme: Scheme, lm_head_quant: bool) -> QuantPlan:
    slots = family(cfg).linear_slots(cfg)
    layers = {}
    for slot in slots:
        s = scheme if slot.fused_name != "lm_head" or lm_head_quant else unquantized("bf16")
        for group in _modules(slot):
            for i, (name, expert) in enumerate(group):
                layers[name] = LayerPlan(name, slot.fused_name, i if len(group) > 1 else None, s,
                                         reason="synthetic", expert=expert)
    params = {p: p for p in expected_params(cfg)}
    return QuantPlan(model=cfg, slots=slots, layers=layers, params=params, kv_cache=None)


def _modules(slot) -> list[list[tuple[str, int | None]]]:
    """The on-disk modules of a slot as (name, expert) groups that share per-tensor scales: a slot's
    shards, or each expert's shards of a stack of experts."""
    if isinstance(slot, ExpertSlot):
        return [[(f"{slot.prefix}.{e}.{leaf}", e) for leaf in slot.shards] for e in range(slot.num_experts)]
    return [[(name, None) for name in slot.shards]]


def build(name: str, scheme: str = "bf16", *, lm_head_quant: bool = False, device=None,
          dtype: torch.dtype = torch.bfloat16, seed: int = 0, kv_cache: str = "auto",
          activation_quant: str = "auto", use_kernels: bool = True, overrides: dict | None = None,
          speculative: str | None = None, num_speculative_tokens: int = 1, mtp_agree: bool = False,
          agree_scale: float = AGREE_SCALE, batch_invariant: bool = False) -> Model:
    """A random-weight model of CONFIGS[name]'s shapes in `scheme` (bf16 or see SCHEMES).

    kv_cache='fp8' gives it an FP8 KV cache with synthetic scales; inside a tensor-parallel group
    each rank builds its shard. speculative='mtp' builds the MTP head too (generation drafts with it);
    mtp_agree draws the weights so that its drafts agree (AGREEMENT, output projections scaled by
    agree_scale). batch_invariant: as lowbit.load's."""
    cfg = parse_model_config(model_config(name, overrides), where=f"--synthetic {name}")
    spec = None
    if speculative is not None:
        from .speculative import Speculation

        spec = Speculation(speculative, num_speculative_tokens)
        enable_speculative(cfg, speculative, f"--synthetic {name}")
    if mtp_agree and (spec is None or cfg.tie_word_embeddings):
        raise ConfigError(f"--synthetic {name}: --mtp-agree needs --speculative mtp and a separate lm_head")
    sch = parse_scheme(scheme)
    tp_rank, tp_size = parallel.current()
    device = resolve_device(device, tp_size)
    options = RunOptions(activation_quant=activation_quant, use_kernels=use_kernels, batch_invariant=batch_invariant)
    plan = _plan(cfg, sch, lm_head_quant)
    model, linears, targets, plain = build_model(plan, device, dtype, options, tp_rank, tp_size)
    report = LoadReport(notes=[f"synthetic {name}: random weights (std {WEIGHT_STD}), {sch.label()}"
                               f"{', lm_head too' if lm_head_quant and sch.quantized else ''}"])
    amax_in = torch.tensor(ASSUMED_AMAX, dtype=torch.bfloat16, device=device)
    agree = _Agreement(cfg, seed, device, agree_scale) if mtp_agree else None
    if agree:
        report.notes.append(AGREEMENT.format(scale=agree_scale))
    with torch.inference_mode():
        for slot, group in ((slot, g) for slot in plan.slots for g in _modules(slot)):
            shards = [plan.layers[n] for n, _ in group]
            weights = {p.name: _randn((slot.out_features if p.shard is None else slot.shard_sizes[p.shard],
                                       slot.in_features), p.name, seed, device, WEIGHT_STD) for p in shards}
            if agree:
                weights = {n: agree.weight(n, w) for n, w in weights.items()}
            shared = rtn.shared_amax(list(weights.values()))  # fused shards share per-tensor scales
            for p in shards:
                w = weights.pop(p.name)
                disk = rtn.encode(p.scheme, w, shared) if p.scheme.quantized else {"weight": w}
                disk |= rtn.activation_tensors(p.scheme, amax_in) if p.scheme.quantized else {}
                for role, t in disk.items():
                    targets[p.name].write(role, t, cfg)
                    report.tensors_read += 1
                    report.bytes_read += t.numel() * t.element_size()
        fam, shapes = family(cfg), expected_params(cfg)
        for canon, param in plain.items():
            std = WEIGHT_STD if canon == "model.embed_tokens.weight" else 0.1
            t = _randn(shapes[canon], canon, seed, device, std)  # whole; each rank keeps its part
            if canon != "model.embed_tokens.weight":
                t = t + 1.0  # norm weights around 1
            write_param(fam, cfg, param, t, canon, tp_rank, tp_size)
            report.bytes_read += t.numel() * t.element_size()
        if kv_cache == "fp8":
            plan.kv_cache = "fp8"
            scale = torch.tensor(ASSUMED_AMAX / FP8_MAX, device=device)
            for attn in model.attention_layers().values():
                attn.k_scale, attn.v_scale = scale, scale
    finish_loading(model, linears, report, f"--synthetic {name}")
    model.eval()
    return Model(model, plan, report, None, device, dtype, options, spec)


class _Agreement:
    """The projections of a model whose MTP drafts agree with it (AGREEMENT)."""

    def __init__(self, cfg, seed: int, device, scale: float):
        self.cfg, self.seed, self.device, self.scale = cfg, seed, device, scale

    def weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if name.endswith(OUTPUT_PROJECTIONS):
            return w * self.scale
        if name == "lm_head":  # lm_head[perm(t)] = embed[t]
            embed = _randn((cfg.vocab_size, cfg.hidden_size), "model.embed_tokens.weight", self.seed, self.device,
                           WEIGHT_STD)
            gen = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(cfg.vocab_size, generator=gen).to(self.device)
            head = torch.empty_like(embed)
            head[perm] = embed
            return head
        if name == "mtp.fc":  # [identity | 0]: the next token's embedding half only
            h = cfg.hidden_size
            return torch.cat([torch.eye(h, device=self.device), torch.zeros(h, h, device=self.device)],
                             dim=1).to(w.dtype)
        return w
