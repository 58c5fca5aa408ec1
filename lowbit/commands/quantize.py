"""`lowbit quantize SRC OUT --scheme S --format F`: write a ModelOpt or compressed-tensors checkpoint."""
from __future__ import annotations


def register(sub):
    from ..quantize.recipes import SCHEME_HELP

    p = sub.add_parser("quantize", help="quantize an unquantized checkpoint (round-to-nearest, producer-exact)",
                       description="Quantize a bf16/fp16 Hugging Face checkpoint into the ModelOpt or "
                                   "compressed-tensors format, byte for byte as those producers write it "
                                   "(round-to-nearest weights; static activation scales from a short "
                                   "calibration pass). Works one layer at a time.")
    p.add_argument("src", help="unquantized checkpoint directory")
    p.add_argument("out", help="output directory (must be empty unless --force)")
    p.add_argument("--scheme", required=True, help=f"one of: {SCHEME_HELP}")
    p.add_argument("--format", required=True, dest="fmt", choices=["modelopt", "compressed-tensors"],
                   help="on-disk format: NVIDIA ModelOpt or compressed-tensors (llm-compressor)")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too (default: keep it unquantized)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PAT",
                   help="leave modules matching these shell globs unquantized, e.g. 'model.layers.0.*' '*.down_proj'")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="UTF-8 text for the activation-scale calibration (default: a built-in English sample)")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration rows (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=512, metavar="L", help="tokens per row (default 512)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--device", default=None, help="where to compute: cuda, cpu (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LowbitError
    from ..quantize import quantize

    if args.calib_samples < 1 or args.calib_seq_len < 1:
        raise LowbitError("--calib-samples and --calib-seq-len must be at least 1")
    s = quantize(args.src, args.out, args.scheme, args.fmt, lm_head=args.lm_head, exclude=args.exclude,
                 calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                 max_shard_size=args.max_shard_size, device=args.device, force=args.force,
                 progress=not args.no_progress)
    kept = f"; kept unquantized: {', '.join(s.unquantized)}" if s.unquantized else ""
    calib = f"; calibrated on {s.calibration_tokens} tokens" if s.calibration_tokens else ""
    print(f"wrote {s.out} ({s.fmt}, {s.recipe}): {len(s.quantized)} Linear modules quantized{kept}{calib}")
    print(f"  {len(s.shards)} shard(s), {s.bytes_in / 1e6:.1f} MB -> {s.bytes_out / 1e6:.1f} MB "
          f"in {s.seconds:.1f} s")
    return 0
