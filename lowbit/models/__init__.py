"""One file per model family; `model_class(cfg)` picks it."""
from ..config import ModelConfig


def model_class(cfg: ModelConfig):
    if cfg.family == "phi3":
        from .phi3 import Phi3ForCausalLM

        return Phi3ForCausalLM
    from .llama import LlamaForCausalLM

    return LlamaForCausalLM
