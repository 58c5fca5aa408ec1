"""Staged tensor-parallel check on a multi-GPU machine: each stage has its own time limit and says
where it stopped (ranks print their stacks before the launcher gives up).

    python3 benchmarks/tp_probe.py            # on 2 GPUs
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time

import torch

from lowbit import parallel, synthetic

T0 = time.monotonic()


def say(*a):
    print(f"[{time.monotonic() - T0:7.1f}s pid {os.getpid()}]", *a, flush=True)


def _allreduce():
    r, n = parallel.current()
    say(f"rank {r}/{n} on {parallel.device()}: group up")
    x = torch.full((4,), float(r + 1), device=parallel.device())
    parallel.all_reduce(x)
    torch.cuda.synchronize()
    say(f"rank {r}: all_reduce -> {x.tolist()}")
    return x.cpu()


def _logits(scheme, graphs):
    r, _ = parallel.current()
    m = synthetic.build("small", scheme, lm_head_quant=True, seed=1)
    say(f"rank {r}: built {scheme}")
    out = m.logits(torch.arange(3, 22).view(1, -1)).float().cpu()
    say(f"rank {r}: logits")
    m.engine(2, 64, cuda_graphs=graphs)
    toks = [x.output_ids for x in m.generate([[5, 6, 7], [9, 10]], max_new_tokens=8, ignore_eos=True)]
    say(f"rank {r}: generated (graphs={graphs}) {toks}")
    return out, toks


if __name__ == "__main__":
    faulthandler.dump_traceback_later(float(os.environ.get("PROBE_S", "280")), exit=True)
    say("GPUs", torch.cuda.device_count(), {k: v for k, v in os.environ.items() if "NCCL" in k or "MULTICAST" in k
                                            or "NVLS" in k})
    res = parallel.launch(2, _allreduce, timeout=60)
    say("stage 1 all_reduce:", [t.tolist() for t in res])
    for scheme, graphs in [("bf16", False), ("bf16", True), ("int4-g128", True)]:
        res = parallel.launch(2, _logits, scheme, graphs, timeout=90)
        ref = _logits(scheme, graphs)
        err = ((res[0][0] - ref[0]).norm() / ref[0].norm()).item()
        say(f"stage {scheme} graphs={graphs}: rel err vs tp=1 {err:.2e}, tokens equal {res[0][1] == ref[1]}")
    sys.exit(0)
