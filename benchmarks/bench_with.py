"""`lowbit bench` with kernel switches set first, for A/B runs of kernels that are off by default:

    python benchmarks/bench_with.py gemv -- --synthetic llama-3-8b --scheme nvfp4 --json

`gemv`: lowbit.kernels.w4.USE_GEMV and lowbit.kernels.moe.USE_GEMV on (lowbit/kernels/gemv.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWITCHES = {"gemv": [("lowbit.kernels.w4", "USE_GEMV"), ("lowbit.kernels.moe", "USE_GEMV")]}


def main() -> int:
    import importlib

    args = sys.argv[1:]
    sep = args.index("--") if "--" in args else len(args)
    for name in args[:sep]:
        for module, attr in SWITCHES[name]:
            setattr(importlib.import_module(module), attr, True)
    from lowbit.cli import main as cli

    return cli(["bench"] + args[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
