"""Static activation scales: the input amax of every Linear, from a layer-by-layer forward.

The unquantized model runs one decoder layer at a time (transformers' own layer classes, built on
the meta device and filled with one layer's weights at a time), so calibration needs the memory of
one layer plus the hidden states of the calibration tokens, never the whole model. Amax is taken
on the unquantized model in its own dtype, as ModelOpt's max calibration does.

Calibration text: --calib FILE, or the small English sample in lowbit/data/calib.txt. Paragraphs
(blank-line separated) are tokenized with the source's tokenizer, concatenated and cut into
`samples` rows of `seq_len` tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, LowbitError

BUILTIN_TEXT = Path(__file__).resolve().parents[1] / "data" / "calib.txt"
BATCH = 8  # calibration rows per forward


def calibration_tokens(src: Path, text_file: Path | None, samples: int, seq_len: int) -> torch.Tensor:
    """[rows, seq_len] token ids; fewer rows (or a shorter row) when the text is short."""
    from transformers import AutoTokenizer

    path = Path(text_file) if text_file else BUILTIN_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read calibration text {path}: {e}") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise LowbitError(f"calibration text {path} is empty; give a UTF-8 text file with some paragraphs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{src}: no usable tokenizer for calibration ({e}); copy the tokenizer files "
                          f"into the source folder") from None
    ids: list[int] = []
    for p in paragraphs:
        ids += tokenizer(p)["input_ids"]
    seq_len = min(seq_len, len(ids))
    rows = max(1, min(samples, len(ids) // seq_len))
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


class LayerwiseCalibrator:
    """Runs the model one layer at a time over fixed calibration tokens, recording Linear input amax.

    `read(canonical_tensor_name)` returns a source tensor; the caller owns reading and freeing."""

    def __init__(self, src: Path, tokens: torch.Tensor, read: Callable[[str], torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(src)
        config._attn_implementation = "sdpa"  # causal attention without building a mask
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        body = getattr(model, "model", None)
        if not all(hasattr(body, a) for a in ("layers", "norm", "rotary_emb")):
            raise ConfigError(f"{src}: calibration runs text models laid out as model.layers.N "
                              f"({type(model).__name__} is not); choose a scheme without static activation "
                              f"scales (fp8-dynamic, nvfp4a16, w4a16, w8a16, w8a8)")
        self.body, self.device = body, device
        rotary = type(body.rotary_emb)(config=config).to(device)
        embed = read("model.embed_tokens.weight").to(device)
        self.positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
        self.hidden = [nn.functional.embedding(rows.to(device), embed) for rows in tokens.split(BATCH)]
        self.position_embeddings = rotary(self.hidden[0], self.positions)

    def _load(self, module: nn.Module, prefix: str, read: Callable[[str], torch.Tensor]) -> None:
        state = {k: read(prefix + k).to(self.device) for k in module.state_dict()}
        module.load_state_dict(state, assign=True)

    @torch.no_grad()
    def layer(self, index: int, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run layer `index` over the hidden states (updating them); canonical module -> input amax."""
        layer = self.body.layers[index]
        prefix = f"model.layers.{index}."
        self._load(layer, prefix, read)
        amax: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(_module, args):
                a = args[0].abs().amax()
                amax[name] = a if name not in amax else torch.maximum(amax[name], a)
            return record

        handles = [m.register_forward_pre_hook(hook(prefix + n)) for n, m in layer.named_modules()
                   if isinstance(m, nn.Linear)]
        try:
            for i, h in enumerate(self.hidden):
                out = layer(h, attention_mask=None, position_ids=self.positions,
                            position_embeddings=self.position_embeddings)
                self.hidden[i] = out[0] if isinstance(out, tuple) else out
        finally:
            for handle in handles:
                handle.remove()
            layer.to("meta")  # free this layer's weights
        return amax

    @torch.no_grad()
    def head_input_amax(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Input amax of the LM head: the final norm of the last hidden states."""
        self._load(self.body.norm, "model.norm.", read)
        return torch.stack([self.body.norm(h).abs().amax() for h in self.hidden]).amax()
