"""`lowbit bench PATH | --synthetic NAME --scheme S`: end-to-end speed of the engine.

Measures prefill tokens/s (batch 1, each --prompt-lens), decode tokens/s and ms/token for each
--batches size (--new-tokens steps after a --decode-prompt-token prompt), the bytes a decode step
reads (weights, and the KV cache at the mean context) and the bandwidth that achieves as a share of
the device-to-device copy bandwidth measured here, peak GPU memory while loading and while running,
and the model's memory against its on-disk bytes. --compare-hf times transformers in bf16 on the same shapes in the same process.
Prints a table, or JSON with --json. --tp N runs N tensor-parallel ranks (rank 0 reports).
--speculative mtp also times batch-1 greedy generation with MTP drafting against plain decoding (the
acceptance rate, the speed-up, and whether the tokens are identical); on a --synthetic model
--mtp-agree draws the MTP weights to agree with the model (lowbit/synthetic.py AGREEMENT), since
random ones are almost never accepted.
--batch-invariant measures prefill and decode again with the batch-invariant mode on (lowbit/kernels/
invariance.py) and reports each rate beside the default's.
"""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("bench", help="prefill/decode throughput, bandwidth share, memory (optionally vs transformers)")
    p.add_argument("path", nargs="?", help="checkpoint directory (or use --synthetic)")
    p.add_argument("--synthetic", metavar="NAME", help="random-weight model: llama-3-8b, llama-3-70b-layer, qwen3-8b, qwen3-30b-a3b, qwen3.5-27b, "
                   "qwen3.5-35b-a3b, nemotron-h-8b, small, tiny, tiny-moe")
    p.add_argument("--scheme", default="bf16", help="with --synthetic: bf16, fp8, fp8-channel, nvfp4, w4a16-nvfp4, "
                                                   "int4-g128, int8-w8a8 (or a `lowbit quantize` preset)")
    p.add_argument("--lm-head-quant", action="store_true", help="with --synthetic: quantize lm_head too")
    p.add_argument("--kv-cache-fp8", action="store_true", help="with --synthetic: an FP8 KV cache")
    p.add_argument("--prompt-lens", default=None, help="prefill prompt lengths, comma-separated (default: 512,2048, "
                                                      "those that fit the model's max_position_embeddings)")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=256, help="decode steps per batch size")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt length before the decode steps")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers (bf16) on the same shapes")
    p.add_argument("--hf-new-tokens", type=int, default=64, help="decode steps timed for transformers")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--mtp-agree", action="store_true",
                   help="with --synthetic and --speculative mtp: MTP weights drawn to agree with the model")
    from .generate import add_load_options, add_speculative_options

    add_load_options(p)
    add_speculative_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LowbitError

    if bool(args.path) == bool(args.synthetic):
        raise LowbitError("give a checkpoint PATH or --synthetic NAME (one of them)")
    from ..bench import bench, format_table
    from .generate import check_speculative_options

    if args.tp < 1:
        raise LowbitError("--tp must be >= 1")
    if args.mtp_agree and not (args.synthetic and args.speculative):
        raise LowbitError("--mtp-agree draws a --synthetic model's MTP weights: give --synthetic NAME --speculative mtp")
    check_speculative_options(args)
    if args.tp > 1:
        from .. import parallel

        result = parallel.launch(args.tp, bench, vars(args))[0]
    else:
        result = bench(vars(args))
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


