"""`lowbit generate PATH --prompt TEXT`: load a checkpoint and generate, streaming text as it comes."""
from __future__ import annotations

import json
import sys


def add_load_options(p):
    """Options shared by every command that loads a model."""
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="compute dtype: bfloat16, float16, float32 (default: the checkpoint's)")
    p.add_argument("--activation-quant", default="auto", choices=["auto", "weight-only", "emulate"],
                   help="NVFP4 W4A4 activations: weight-only by default on GPUs without FP4 tensor cores; "
                        "'emulate' reproduces the activation quantization exactly")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "bf16"],
                   help="auto: as the checkpoint says (FP8 when it has KV scales); bf16: full-precision cache")
    p.add_argument("--trust-tensors", action="store_true",
                   help="when the quantization config disagrees with the tensors, resolve from the tensors")
    p.add_argument("--no-kernels", action="store_true", help="run the plain-PyTorch reference paths")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens do not depend on what else runs in the batch, on the GPU too (fixed "
                        "GEMM tilings, at some speed; bench: measure with the mode off and on)")


def load_from_args(args, announce: bool = True):
    """lowbit.load with the command's options; on success one line on stderr says what was loaded and how
    fast (a load large enough to take seconds shows its progress as it goes: lowbit/loader.py)."""
    import time

    import lowbit
    from .. import parallel
    from ..progress import step

    quiet = not announce or parallel.current()[0] != 0
    t0 = time.perf_counter()
    model = lowbit.load(args.path, device=args.device, dtype=args.dtype, activation_quant=args.activation_quant,
                        kv_cache=args.kv_cache, trust_tensors=args.trust_tensors, use_kernels=not args.no_kernels,
                        speculative=getattr(args, "speculative", None),
                        num_speculative_tokens=getattr(args, "num_speculative_tokens", 1),
                        batch_invariant=getattr(args, "batch_invariant", False))
    if not quiet:
        r = model.report
        step(f"loaded {r.tensors_read} tensors ({r.bytes_read / 1e6:.1f} MB) on {model.device} in "
             f"{time.perf_counter() - t0:.1f} s")
    return model


def add_speculative_options(p):
    """--speculative mtp / --num-speculative-tokens (generate, bench)."""
    p.add_argument("--speculative", default=None, choices=["mtp"],
                   help="draft tokens with the checkpoint's MTP head and verify them in one forward (Qwen3.5/3.6; "
                        "greedy only, output identical to plain decoding)")
    p.add_argument("--num-speculative-tokens", type=int, default=1, help="drafts per step with --speculative")


def check_speculative_options(args) -> None:
    """Refuse --speculative settings before any loading (generate, bench)."""
    if not args.speculative:
        return
    from ..errors import LowbitError
    from ..speculative import Speculation

    Speculation(args.speculative, args.num_speculative_tokens)
    if args.tp > 1:
        raise LowbitError("--speculative mtp runs without tensor parallelism; drop --tp or --speculative")


def register(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text (repeat for a batch); '-' reads the prompt from standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "output_ids", "text"} per prompt')
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: spawned here (one GPU each), or the ones torchrun started")
    add_load_options(p)
    add_speculative_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LowbitError

    if args.max_new_tokens < 0:
        raise LowbitError("--max-new-tokens must be >= 0")
    check_speculative_options(args)
    if args.speculative:
        from ..sampling import SamplingParams
        from ..speculative import check_greedy

        check_greedy(SamplingParams(max(0.0, args.temperature)))
    args.prompt = read_prompts(args.prompt)
    try:
        from ..sampling import SamplingParams

        SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise LowbitError(str(e)) from None
    if args.tp < 1:
        raise LowbitError("--tp must be >= 1")
    if args.tp > 1:
        from .. import parallel

        parallel.launch(args.tp, _on_rank, vars(args))
        return 0
    return _generate(args)


def read_prompts(prompts: list[str]) -> list[str]:
    """'-' stands for standard input (once); an empty prompt is refused before anything loads."""
    from ..errors import LowbitError

    if prompts.count("-") > 1:
        raise LowbitError("--prompt - (standard input) can be given once")
    out = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in prompts]
    for i, p in enumerate(out):
        if not p:
            src = "standard input was empty" if prompts[i] == "-" else "it is empty"
            raise LowbitError(f"--prompt number {i + 1}: {src}; give some text")
    return out


def _on_rank(opts: dict) -> None:
    """One tensor-parallel rank: every rank computes, rank 0 prints."""
    import argparse
    import os

    from .. import parallel

    args = argparse.Namespace(**opts)
    if parallel.current()[0] != 0:
        sys.stdout = open(os.devnull, "w")
    _generate(args)
    sys.stdout.flush()


def _generate(args) -> int:
    model = load_from_args(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop, chat=args.chat)
    if args.json:
        results = model.generate(args.prompt, **kwargs)
        for r in results:
            print(json.dumps({"prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "text": r.text,
                              "finish_reason": r.finish_reason}))
        return 0
    run_ = model.stream(args.prompt, **kwargs)
    single = len(args.prompt) == 1
    for ev in run_:
        if single:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if single:
        sys.stdout.write("\n")
    else:
        for i, r in enumerate(run_.results):
            print(f"[{i}] {args.prompt[i]!r} -> {r.text!r} ({r.finish_reason})")
    return 0
