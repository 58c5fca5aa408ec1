"""`lowbit inspect PATH [--json] [--trust-tensors] [--speculative mtp]`: per-layer schemes, a summary and
every problem (with --speculative mtp, of the checkpoint as loaded for MTP drafting: the MTP head's
projections and parameters included).

Exit status: 0 loadable, 1 problems found, 2 the checkpoint cannot be read (bad path, malformed or
unsupported config, damaged safetensors file), 3 internal error. With --json, exit 2 still prints
{"path", "loadable": false, "error"} on stdout.
"""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("inspect", help="show each layer's quantization scheme and check it against the tensors",
                       description="Show each layer's quantization scheme, the scale tensors, a summary and every "
                                   "problem that would stop `lowbit load` (reads headers, JSON and the small scale "
                                   "tensors; never the weights).",
                       epilog="exit status: 0 loadable; 1 problems found (listed; the checkpoint does not load as "
                              "is); 2 the checkpoint cannot be read at all (bad path, malformed or unsupported "
                              "config, damaged safetensors file: one line on stderr); 3 internal error (a bug)")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-tensors", action="store_true",
                   help="when the quantization config disagrees with the tensors, resolve from the tensors "
                        "(each override is reported)")
    p.add_argument("--speculative", default=None, choices=["mtp"],
                   help="inspect as loaded for MTP speculative decoding (the mtp.* tensors used, not skipped)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inspect import render, report

    from ..errors import LowbitError

    try:
        rep = report(args.path, trust_tensors=args.trust_tensors, speculative=args.speculative)
    except LowbitError as e:
        if args.json:  # a machine reader still gets JSON; the one-line error goes to stderr as usual
            print(json.dumps({"path": str(args.path), "loadable": False, "error": str(e),
                              "error_type": type(e).__name__}, indent=1))
        raise
    print(json.dumps(rep, indent=1) if args.json else render(rep))
    return 0 if rep["loadable"] else 1
