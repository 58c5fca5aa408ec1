"""`lowbit inspect PATH [--json] [--trust-tensors]`: per-layer schemes, a summary and every problem.

Exit status: 0 loadable, 1 problems found, 2 user error (bad path, malformed or unsupported config).
"""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("inspect", help="show each layer's quantization scheme and check it against the tensors")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-tensors", action="store_true",
                   help="when the quantization config disagrees with the tensors, resolve from the tensors "
                        "(each override is reported)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inspect import render, report

    rep = report(args.path, trust_tensors=args.trust_tensors)
    print(json.dumps(rep, indent=1) if args.json else render(rep))
    return 0 if rep["loadable"] else 1
