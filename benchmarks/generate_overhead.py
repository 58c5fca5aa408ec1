"""Where Model.generate's time goes beside the engine's decode step (bench reports both:
`generate_b1_tok_s` and `decode.1`): times engine.decode alone, then generate at two lengths (fixed
vs per-token overhead), replays the batch-1 decode graph three ways (all launched at once, pipelined as
the Scheduler runs it, two captures alternating: does relaunching one graph exec block the host?),
then profiles one generate call (top host and device ops).

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
    graph_launches(e, slot)
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


def graph_launches(e, slot, steps: int = 64) -> None:
    """Is relaunching one CUDA-graph exec while its previous launch runs what costs generate its
    time? The batch-1 decode graph replayed `steps` times: all launched at once; pipelined as the
    Scheduler does (launch step t+1, then wait for step t's event); the same with two captures of
    the step alternating. Prints the time per step and the host time of one replay() call."""
    from lowbit.engine import capture_graph

    bucket = next(b for b in e.buckets if b >= 1)
    graph = e._graph(bucket)
    if graph is None:
        print("graph launches: no CUDA graph for batch 1:", e.notes)
        return
    g1, slot_ids, _ = graph
    slot_ids.copy_(torch.tensor([slot] + [e.cache.pad_slot] * (bucket - 1), device=slot_ids.device))
    e._graph_slots.pop(bucket, None)
    with torch.inference_mode():  # as the engine captures its own
        g2, _ = capture_graph(lambda: e._decode_logits(slot_ids), e._pool)

    def run(graphs, wait: bool):
        launch, prev = [], None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            s = time.perf_counter()
            graphs[i % len(graphs)].replay()
            launch.append(time.perf_counter() - s)
            ev = torch.cuda.Event()
            ev.record()
            if wait and prev is not None:
                prev.synchronize()
            prev = ev
        torch.cuda.synchronize()
        launch.sort()
        return (time.perf_counter() - t0) / steps * 1e3, launch[len(launch) // 2] * 1e3

    for name, graphs, wait in (("one exec, all launched", [g1], False), ("one exec, pipelined", [g1], True),
                               ("two execs alternating, pipelined", [g1, g2], True)):
        run(graphs, wait)  # warm
        per_step, replay = run(graphs, wait)
        print(f"graph launches: {name}: {per_step:.3f} ms/step, replay() {replay:.3f} ms on the host")


if __name__ == "__main__":
    main()
