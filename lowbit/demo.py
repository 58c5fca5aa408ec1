"""`lowbit demo`: the whole pipeline on a small model built on the spot, with no download.

1. Build a small Llama deterministically (fixed seed) with a byte-level BPE tokenizer trained on
   lowbit's built-in English sample, and save it as a bf16 Hugging Face checkpoint.
2. Quantize it with `lowbit quantize` into several schemes, in both ModelOpt and compressed-tensors
   formats.
3. Inspect each output (same resolution the loader uses), load it, and compare its logits with the
   bf16 model's on a held-out text: top-1 token agreement and max logit error; then generate and
   time tokens/s.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "calib.txt"

# (scheme, format, quantize lm_head too)
DEMO_SCHEMES = [
    ("fp8", "modelopt", False),
    ("nvfp4", "modelopt", True),
    ("nvfp4a16", "modelopt", False),
    ("mixed", "modelopt", False),
    ("fp8-dynamic", "compressed-tensors", False),
    ("nvfp4a16", "compressed-tensors", True),
    ("w4a16-g128", "compressed-tensors", False),
    ("w4a16-g64-asym", "compressed-tensors", True),
    ("w8a16", "compressed-tensors", False),
    ("w8a8", "compressed-tensors", False),
]


@dataclass
class DemoRow:
    scheme: str
    fmt: str
    lm_head: bool
    weight_bytes: int
    top1: float  # share of positions where the argmax token equals the bf16 model's
    max_err: float  # max |logit - bf16 logit|
    tokens_per_s: float
    problems: int
    sample: str


def build_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([DATA.read_text(encoding="utf-8")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def bigram_weights(token_ids: list[int], vocab: int, hidden: int, gen: torch.Generator):
    """Embeddings and an LM head that make the model predict the sample text's bigram statistics.

    A random model's logits are nearly flat, so any quantization noise flips its top-1 token and the
    demo would show only noise. Instead, without any training: random unit-RMS embeddings E, and an
    LM head W solving E @ W.T ~= log P(next | current) in least squares (rank `hidden`).
    """
    ids = torch.tensor(token_ids)
    counts = torch.full((vocab, vocab), 0.05)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    logp = counts.log() - counts.sum(-1, keepdim=True).log()
    logp = logp - logp.mean(-1, keepdim=True)  # softmax ignores a per-row constant
    emb = torch.randn(vocab, hidden, generator=gen)
    head = torch.linalg.lstsq(emb, logp).solution.T.contiguous()  # [vocab, hidden]
    return emb, head


def build_base_model(out: Path, seed: int = 0):
    """A small Llama (hidden 256, 4 layers, GQA, untied head) that babbles the sample text, in bf16."""
    import transformers

    tok = build_tokenizer(out)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.05)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    emb, head = bigram_weights(tok(DATA.read_text(encoding="utf-8"))["input_ids"], len(tok), 256, gen)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:  # keep the residual stream close to the token's embedding
            layer.self_attn.o_proj.weight.mul_(0.5)
            layer.mlp.down_proj.weight.mul_(0.5)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own table; no "Writing model shards" bar
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return tok


def run_demo(workdir: Path | None = None, device=None, schemes=DEMO_SCHEMES, max_new_tokens: int = 16,
             log=print) -> list[DemoRow]:
    import lowbit
    from lowbit.checkpoint import Checkpoint
    from lowbit.quant.resolve import resolve
    from lowbit.quantize import quantize

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-demo-")
        workdir = Path(tmp.name)
    try:
        base = workdir / "base-bf16"
        t0 = time.perf_counter()
        log(f"building a small Llama and its tokenizer in {base}")
        tok = build_base_model(base)
        log(f"built a small Llama (4 layers, hidden 256, vocab {len(tok)}) in {base} "
            f"({time.perf_counter() - t0:.1f} s)")
        text = DATA.read_text(encoding="utf-8").split("\n\n")[-1]
        ids = torch.tensor([tok(text)["input_ids"][:96]])
        prompt = "The kettle had been"
        ref_model = lowbit.load(base, device=device)
        ref = ref_model.logits(ids)
        rows = [_measure(ref_model, "bf16", "-", False, ids, ref, prompt, max_new_tokens, 0)]
        log(f"bf16 reference loaded and run on {ref_model.device} ({rows[0].tokens_per_s:.0f} tokens/s)")
        del ref_model
        for i, (scheme, fmt, lm_head) in enumerate(schemes):
            out = workdir / f"{scheme}-{fmt}{'-lmhead' if lm_head else ''}"
            t = time.perf_counter()
            log(f"[{i + 1}/{len(schemes)}] {scheme} ({fmt}{', lm_head too' if lm_head else ''}): quantize, "
                f"inspect, load, run")
            quantize(base, out, scheme, fmt, lm_head=lm_head, calib_samples=8, calib_seq_len=64, device=device)
            problems = len(resolve(Checkpoint(out)).problems)
            model = lowbit.load(out, device=device)
            rows.append(_measure(model, scheme, fmt, lm_head, ids, ref, prompt, max_new_tokens, problems))
            log(f"[{i + 1}/{len(schemes)}] {scheme} ({fmt}): top-1 {rows[-1].top1:.0%}, {problems} problem(s), "
                f"{time.perf_counter() - t:.1f} s")
            del model
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def _measure(model, scheme, fmt, lm_head, ids, ref, prompt, n, problems) -> DemoRow:
    logits = model.logits(ids)
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    err = (logits - ref).abs().max().item()
    model.generate([prompt], max_new_tokens=2, ignore_eos=True)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = model.generate([prompt], max_new_tokens=n, ignore_eos=True)[0]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    tps = len(r.output_ids) / (time.perf_counter() - t)
    return DemoRow(scheme, fmt, lm_head, model.weight_bytes(), top1, err, tps, problems, r.text)


def format_table(rows: list[DemoRow]) -> str:
    head = f"{'scheme':<15} {'format':<19} {'lm_head':<7} {'weights':>9} {'top-1':>7} {'max err':>8} " \
           f"{'tok/s':>7} {'problems':>8}  sample"
    lines = [head, "-" * len(head)]
    for r in rows:
        sample = r.sample.replace("\n", " ")[:40]
        lines.append(f"{r.scheme:<15} {r.fmt:<19} {'quant' if r.lm_head else 'bf16':<7} "
                     f"{r.weight_bytes / 1e6:>7.2f}MB {r.top1 * 100:>6.1f}% {r.max_err:>8.3f} "
                     f"{r.tokens_per_s:>7.1f} {r.problems:>8}  {sample!r}")
    return "\n".join(lines)
