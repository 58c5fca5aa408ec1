"""Where Model.generate's time goes beside the engine's decode step (bench reports both:
`generate_b1_tok_s` and `decode.1`): times engine.decode alone, then generate at two lengths (fixed
vs per-token overhead), then profiles one generate call (top host and device ops).

    python benchmarks/generate_overhead.py --synthetic qwen3-30b-a3b --scheme bf16
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit import synthetic  # noqa: E402
from lowbit.sampling import SamplingParams  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", default="qwen3-30b-a3b")
    p.add_argument("--scheme", default="bf16")
    p.add_argument("--prompt", type=int, default=128)
    a = p.parse_args()
    m = synthetic.build(a.synthetic, a.scheme, device="cuda")
    ids = torch.randint(3, m.config.vocab_size, (a.prompt,)).tolist()
    e = m.engine(1, a.prompt + 300)
    m.generate([ids], max_new_tokens=8, ignore_eos=True)  # capture + compile
    slot = e.acquire()
    e.prefill(slot, ids, SamplingParams()).get()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(64):
        e.decode([slot], SamplingParams())
    torch.cuda.synchronize()
    dec = (time.perf_counter() - t0) / 64
    e.release(slot)
    rows = []
    for n in (32, 128):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate([ids], max_new_tokens=n, ignore_eos=True)
        rows.append((n, time.perf_counter() - t0))
    (n1, t1), (n2, t2) = rows
    per_tok = (t2 - t1) / (n2 - n1)
    print(f"{a.synthetic} {a.scheme}: engine.decode {dec * 1e3:.3f} ms/step (async launches); generate "
          f"{n1} tok {t1 * 1e3:.1f} ms, {n2} tok {t2 * 1e3:.1f} ms -> {per_tok * 1e3:.3f} ms/token + "
          f"{(t1 - n1 * per_tok) * 1e3:.1f} ms fixed")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m.generate([ids], max_new_tokens=32, ignore_eos=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
