"""Canonical module names and the one name-candidate function for VLM-wrapped layouts (seed 003).

Canonical names are the text model's transformers names: `model.layers.3.mlp.down_proj`, `lm_head`,
`model.embed_tokens`. The same text model appears on disk and in configs under other prefixes:

    text      model.X                     lm_head
    vlm-new   model.language_model.X      lm_head               (transformers >= 4.52 VLMs)
    vlm-old   language_model.model.X      language_model.lm_head (LLaVA-style)
    backbone  backbone.X                  lm_head               (Nemotron-H, Mamba: NVIDIA's names)

`to_canonical` maps any of them to the canonical name; `candidates` gives every spelling of a
canonical name. Both tensor names and config names (exclude lists, targets, quantized_layers) go
through these two functions, and nowhere else is a prefix rewritten. (A family renames modules
inside the text model, e.g. Nemotron-H's `backbone.embeddings`, in its `Family.sanitize`.)
"""
from __future__ import annotations

LAYOUTS = ("text", "vlm-new", "vlm-old", "backbone")

# Modules of a VLM checkpoint that are not part of the text model.
VISION_PREFIXES = (
    "model.visual.", "visual.", "model.vision_tower.", "vision_tower.", "model.vision_model.",
    "vision_model.", "model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector.",
    "mm_projector.", "model.vision_embed_tokens.", "model.image_newline", "image_newline",
)


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def to_canonical(name: str) -> str:
    """Any layout's spelling of a text-model name -> the canonical (text) spelling."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model."):]
    if name.startswith("backbone."):
        return "model." + name[len("backbone."):]
    if name == "language_model.lm_head" or name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name


def layout_of(name: str) -> str:
    if name.startswith("model.language_model."):
        return "vlm-new"
    if name.startswith("language_model."):
        return "vlm-old"
    if name.startswith("backbone."):
        return "backbone"
    return "text"


def candidates(canonical: str) -> list[str]:
    """Every spelling of a canonical name, the canonical one first."""
    if canonical == "lm_head" or canonical.startswith("lm_head."):
        return [canonical, "language_model." + canonical]
    if canonical.startswith("model."):
        rest = canonical[len("model."):]
        return [canonical, "model.language_model." + rest, "language_model.model." + rest, "backbone." + rest]
    return [canonical]


def split_tensor_name(name: str) -> tuple[str, str]:
    """`model.layers.0.mlp.up_proj.weight_scale` -> (`model.layers.0.mlp.up_proj`, `weight_scale`)."""
    module, _, leaf = name.rpartition(".")
    return module, leaf
