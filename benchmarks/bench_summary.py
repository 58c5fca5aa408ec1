"""One line per `lowbit bench --json` file: decode tok/s and share of copy bandwidth per batch,
prefill tok/s per length, transformers' figures when timed. For device runs whose files may not all
come back: the summary goes to stdout.

    python benchmarks/bench_summary.py out/*.json
"""
import json
import sys


def line(path: str) -> str:
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        return f"{path}: unreadable ({e.__class__.__name__})"
    dec = " ".join(f"b{b}={v['tok_s']:.1f}tok/s({v.get('share_of_copy_bw', 0):.2f}bw)" for b, v in d.get("decode", {}).items())
    pre = " ".join(f"p{n}={v['tok_s']:.0f}" for n, v in d.get("prefill", {}).items())
    extra = {k: v for k, v in d.items() if k.startswith(("hf", "speedup", "spec", "accept", "batch_inv"))}
    return (f"{path.rsplit('/', 1)[-1]}: {d.get('model')} [{d.get('scheme')}] {d.get('device')} "
            f"copy={d.get('copy_gbps', 0):.0f}GB/s step_bytes={d.get('weight_bytes_per_step', 0) / 1e9:.2f}GB "
            f"{dec} {pre} {json.dumps(extra) if extra else ''} notes={d.get('notes')}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(line(p))
