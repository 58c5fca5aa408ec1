"""`lowbit demo`: build, quantize (every scheme, both formats), inspect, load and run a small model."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("demo", help="see the whole pipeline work on a small model (no download)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the checkpoints in DIR instead of a temp dir")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from ..demo import format_table, run_demo
    from ..progress import step

    from ..model import resolve_device

    resolve_device(args.device)  # an unusable --device fails now, not after building the model
    t0 = time.perf_counter()
    workdir = None
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
    rows = run_demo(workdir, device=args.device, log=step)  # a line per step on stderr, also when piped
    print()
    print(format_table(rows))
    print(f"\ntop-1: share of 96 positions whose most likely next token equals the bf16 model's; "
          f"max err: largest logit difference.\n{len(rows) - 1} quantized checkpoints written, inspected, "
          f"loaded and run in {time.perf_counter() - t0:.1f} s.")
    bad = [r for r in rows if r.problems]
    return 1 if bad else 0
