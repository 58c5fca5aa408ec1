"""Phi-3: the Llama layout with q/k/v and gate/up fused on disk (qkv_proj, gate_up_proj, [gate; up]).

In memory lowbit fuses every family the same way, so Phi-3 needs no code of its own beyond its
registration (longrope / partial rotary are handled by lowbit/layers/rotary.py)."""
from . import register
from .llama import LlamaFamily


class Phi3Family(LlamaFamily):
    name = "phi3"
    architectures = ("Phi3ForCausalLM",)
    model_types = {"phi3": "Phi3ForCausalLM"}

    @staticmethod
    def sliding_window(text, arch):
        w = text.get("sliding_window")  # every layer, as transformers' Phi-3 applies it
        return int(w) if w else None


FAMILY = register(Phi3Family())
