"""Hand-made checkpoints for tests: config.json + safetensors written from a dict of name -> (dtype, shape).

`write_checkpoint` writes real tensors (random, non-zero data) or header-only files (valid headers, the
large tensors a sparse hole: enough for resolve() and `lowbit inspect`, which read headers and scales).
`model_tensors` lists every tensor of a Llama/Phi-3 style model whose projections are stored in
given schemes (on-disk layout from lowbit.quant.formats), for building variants to break.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from lowbit.checkpoint import ST_DTYPES
from lowbit.quant.formats import FLOAT, expected_tensors
from lowbit.quant.scheme import Scheme

PREFIXES = {  # layout -> (prefix replacing "model.", spelling of lm_head)
    "text": ("model.", "lm_head"),
    "vlm-new": ("model.language_model.", "lm_head"),
    "vlm-old": ("language_model.model.", "language_model.lm_head"),
}


def tiny_config(arch: str = "LlamaForCausalLM", quantization_config: dict | None = None, **overrides) -> dict:
    cfg = dict(architectures=[arch], model_type={"Phi3ForCausalLM": "phi3"}.get(arch, "llama"), hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               torch_dtype="bfloat16")
    cfg.update(overrides)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return cfg


def llama8b_config(**overrides) -> dict:
    """Llama-3-8B's shapes."""
    return tiny_config(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, **overrides)


def _on_disk_name(canonical: str, layout: str) -> str:
    prefix, head = PREFIXES[layout]
    if canonical.startswith("lm_head"):
        return head + canonical[len("lm_head"):]
    return prefix + canonical[len("model."):]


def model_tensors(cfg: dict, scheme_of=lambda module: Scheme(), fused: bool = False, layout: str = "text",
                  kv_scales: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the model `cfg` describes: projections in `scheme_of(canonical module name)`
    (stored fused as qkv_proj/gate_up_proj when `fused`), norms and embeddings in BF16."""
    h, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    modules: list[tuple[str, int, int]] = []  # (canonical name, N, K)
    for i in range(n_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        if fused:
            modules += [(f"{a}.qkv_proj", (heads + 2 * kv_heads) * hd, h), (f"{m}.gate_up_proj", 2 * inter, h)]
        else:
            modules += [(f"{a}.q_proj", heads * hd, h), (f"{a}.k_proj", kv_heads * hd, h),
                        (f"{a}.v_proj", kv_heads * hd, h), (f"{m}.gate_proj", inter, h), (f"{m}.up_proj", inter, h)]
        modules += [(f"{a}.o_proj", h, heads * hd), (f"{m}.down_proj", h, inter)]
    if not cfg.get("tie_word_embeddings"):
        modules.append(("lm_head", cfg["vocab_size"], h))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    shapes: dict[str, list[int]] = {}  # weight_shape values
    for name, n, k in modules:
        scheme = scheme_of(name)
        scalar = (1,) if scheme.fmt == "compressed-tensors" else ()
        for role, spec in expected_tensors(scheme, n, k, False).items():
            if not spec.optional:
                dtype = "BF16" if spec.dtype == FLOAT else spec.dtype
                out[f"{name}.{role}"] = (dtype, scalar if spec.shape is None else spec.shape)
                if role == "weight_shape":
                    shapes[f"{name}.{role}"] = [n, k]
    params = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(n_layers):
        params[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        params[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
        if kv_scales:
            out[f"model.layers.{i}.self_attn.k_proj.k_scale"] = ("F32", ())
            out[f"model.layers.{i}.self_attn.v_proj.v_scale"] = ("F32", ())
    out.update({n: ("BF16", s) for n, s in params.items()})
    result = Tensors({_on_disk_name(n, layout): v for n, v in out.items()})
    result.values = {_on_disk_name(n, layout): v for n, v in shapes.items()}
    return result


class Tensors(dict):
    """name -> (dtype, shape), plus `values`: name -> the exact values of tensors whose values matter
    beyond being non-zero (weight_shape). Edits in place keep `values`."""

    values: dict[str, list[int]] = {}


def _random(dtype: str, shape: tuple[int, ...], value=None) -> torch.Tensor:
    t = ST_DTYPES[dtype]
    if value is not None and len(value) == torch.Size(shape).numel():
        return torch.tensor(value).reshape(shape).to(t)
    if t.is_floating_point:
        x = torch.rand(shape) + 0.5  # non-zero
        return x.to(t)
    if t == torch.bool:
        return torch.ones(shape, dtype=t)
    return torch.randint(1, 100, shape, dtype=torch.int64).to(t)


SMALL = 256  # bytes: header-only files still hold real data for tensors this small (scales, weight_shape)


def _write_header_only(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], values: dict):
    """A valid safetensors file whose large tensors are a sparse hole (zeros, no disk space, no time):
    enough for anything that reads headers and scales only, such as resolve() and `lowbit inspect`."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = ST_DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (dtype, shape) in tensors.items():
            begin, end = header[name]["data_offsets"]
            if 0 < end - begin <= SMALL:
                f.seek(8 + len(raw) + begin)
                f.write(_random(dtype, shape, values.get(name)).reshape(-1).view(torch.uint8).numpy().tobytes())
        f.truncate(8 + len(raw) + offset)


def write_checkpoint(path, tensors: dict[str, tuple[str, tuple[int, ...]]], config: dict,
                     hf_quant_config: dict | None = None, shards: int = 1, header_only: bool = False) -> Path:
    """Write config.json (+ hf_quant_config.json) and the tensors, in `shards` files with an index if > 1."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if hf_quant_config is not None:
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=1))
    names = list(tensors)
    files = ["model.safetensors"] if shards == 1 else \
        [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    per = -(-len(names) // shards)
    weight_map = {}
    for i, fname in enumerate(files):
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        weight_map.update({n: fname for n in part})
        values = getattr(tensors, "values", {})
        if header_only:
            _write_header_only(path / fname, part, values)
        else:
            save_file({n: _random(d, s, values.get(n)) for n, (d, s) in part.items()}, path / fname)
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
