"""The public `Model`: a loaded checkpoint with its tokenizer, `logits` and `generate`."""
from __future__ import annotations

from pathlib import Path

import torch

from . import parallel
from .checkpoint import Checkpoint, generation_eos_ids
from .config import parse_dtype
from .errors import LowbitError
from .loader import LoadReport, load_model
from .quant.base import RunOptions
from .quant.resolve import QuantPlan, resolve


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt", "tekken.json")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Model:
    def __init__(self, net: torch.nn.Module, plan: QuantPlan, report: LoadReport, path: Path | None,
                 device: torch.device, dtype: torch.dtype, options: RunOptions, speculative=None):
        self.net, self.plan, self.report, self.path = net, plan, report, path
        self.config = plan.model
        self.device, self.dtype, self.options = device, dtype, options
        self._tokenizer = None
        self._engine = None
        self.speculative = speculative  # a speculative.Speculation when loaded with speculative='mtp'
        if options.batch_invariant:
            from .kernels import invariance

            invariance.check_model(plan, parallel.current()[1])
            invariance.set_enabled(True)

    def engine(self, slots: int, max_len: int, cuda_graphs: bool | None = None, **cache):
        """The decode engine (lowbit.engine.Engine), kept while it has enough slots and length and the
        same cache options (`cache`: block_size, num_blocks, prefix_caching; see Engine)."""
        from .engine import Engine

        e = self._engine
        if e is None or e.num_slots < slots or e.max_len < max_len or (cuda_graphs is not None and
                                                                         e.cuda_graphs != cuda_graphs) \
                or (cache and cache != e.cache_options):
            self._engine = None  # free the old cache before allocating the new one
            e = self._engine = Engine(self, slots, max_len, cuda_graphs=cuda_graphs, **cache)
            e.cache_options = cache
        return e

    # ---------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        if self.path is None:
            raise LowbitError("this model has no tokenizer (a synthetic model); pass token ids instead of text")
        if self._tokenizer is None:
            if not any((self.path / f).exists() for f in TOKENIZER_FILES):
                # transformers would build an empty tokenizer from config.json alone
                raise LowbitError(f"{self.path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy "
                                  f"them from the model this checkpoint was made from, or pass token ids")
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            except (OSError, ValueError) as e:
                raise LowbitError(f"{self.path}: no usable tokenizer ({str(e).splitlines()[0]}); "
                                  f"pass token ids instead of text") from None
        return self._tokenizer

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self._in_vocab(self.tokenizer(prompt)["input_ids"])

    def _in_vocab(self, ids: list[int]) -> list[int]:
        """Token ids from the tokenizer, refused when the model has no embedding for them."""
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise LowbitError(f"{self.path}: the tokenizer produced token id {max(bad)}, but the model's vocabulary "
                              f"has {vocab} entries (vocab_size in config.json): the tokenizer files do not belong "
                              f"to this checkpoint; copy the tokenizer of the model it was made from")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation through the tokenizer's chat template, ready for the assistant's reply."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise LowbitError(f"{self.path}: the tokenizer has no chat template; send plain prompts (no --chat, "
                              f"/v1/completions)")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self._in_vocab(list(ids))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = list(self.config.eos_token_ids)
        for x in generation_eos_ids(self.path) if self.path else []:
            if x not in ids:
                ids.append(x)
        return ids

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward, no cache: LongTensor [B, T] -> float32 logits [B, T, V]."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        hidden = self.net(input_ids, positions)
        return self.net.compute_logits(hidden).float()

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 chat: bool = False, ignore_eos: bool = False):
        """Generate for a batch of prompts (text or token-id lists) -> list[GenerationResult]."""
        from .generate import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop, chat=chat, ignore_eos=ignore_eos)

    def stream(self, prompts, **kwargs):
        """Like generate, but yields StreamEvent(index, token_id, text, finish_reason) as tokens come."""
        from .generate import stream

        return stream(self, prompts, **kwargs)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.net.parameters()) + list(self.net.buffers()))


def resolve_device(device, tp_size: int = 1) -> torch.device:
    """The device to load on: as asked, else this rank's GPU under tensor parallelism, else cuda if any."""
    if device is None:
        return parallel.device() if tp_size > 1 else default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowbitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise LowbitError(f"device {device.type!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
    return device


def load(path, device=None, dtype=None, activation_quant: str = "auto", kv_cache: str = "auto",
         trust_tensors: bool = False, use_kernels: bool = True, progress: bool = True,
         speculative: str | None = None, num_speculative_tokens: int = 1,
         batch_invariant: bool = False) -> Model:
    """Load a checkpoint directory. device: default cuda when available; dtype: default the checkpoint's.
    speculative='mtp': also load the MTP head, and generate drafting num_speculative_tokens tokens per
    step with it (lowbit/speculative.py; greedy only).
    batch_invariant: a row's logits do not depend on the rest of the batch on the GPU either (fixed
    GEMM tilings, at some speed; lowbit/kernels/invariance.py); it turns the process-wide mode on.

    Inside a tensor-parallel group (lowbit.parallel.launch, torchrun) each rank loads its shard."""
    spec = None
    if speculative is not None:
        from .speculative import Speculation

        spec = Speculation(speculative, num_speculative_tokens)
    path = Path(path)
    ckpt = Checkpoint(path)
    tp_rank, tp_size = parallel.current()
    device = resolve_device(device, tp_size)
    options = RunOptions(activation_quant=activation_quant, kv_cache=kv_cache, use_kernels=use_kernels,
                         trust_tensors=trust_tensors, batch_invariant=batch_invariant)
    plan = resolve(ckpt, trust_tensors=trust_tensors, speculative=speculative)
    dtype = parse_dtype(dtype) or plan.model.dtype
    net, report = load_model(ckpt, plan, device, dtype, options, tp_rank, tp_size, progress=progress and tp_rank == 0)
    net.eval()
    ckpt.close()
    return Model(net, plan, report, path, device, dtype, options, spec)
