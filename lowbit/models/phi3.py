"""Phi-3: the Llama layout with q/k/v and gate/up fused on disk (qkv_proj, gate_up_proj, [gate; up]).

In memory lowbit fuses every family the same way, so Phi-3 needs no code of its own beyond its
config (longrope / partial rotary are handled by models/rope.py).
"""
from .llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
