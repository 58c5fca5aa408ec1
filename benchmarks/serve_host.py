"""The server's host ceiling, measured without a GPU: `lowbit serve`'s whole host path (HTTP, the
OpenAI layer, the worker thread, the Scheduler, the engine's own decode and extend with their slot,
block, prefix-cache and sampling work, streaming) under the same load as benchmarks/serve.py, with
only the model's forward replaced (StandInNet) and a modelled device's timing on the engine's
tokens: each decode step or prompt chunk is "ready" a modelled time after the previous one (work
queues on one stream, as on a GPU), and reading its tokens waits until then, releasing the GIL as a
CUDA event does.

It answers: with this host (its CPU, Python, the process's threads), what share of the modelled
device time does the server keep busy, and what throughput does that give against `lowbit bench`'s
batch-N decode (N / step time)? A share near 1 says the remaining gap on the GPU is the device's or
the cost of launching its kernels (not modelled here); a share well below 1 is host overhead this
script can profile (--profile: yappi, CPU time per function of the worker and event-loop threads).

The default step times are the H200 figures of docs/benchmarks.md for synthetic Llama-3-8B NVFP4
(batch 1: 4.1 ms, batch 64: 9.35 ms; prefill ~32 us a token).

  python benchmarks/serve_host.py --seqs 64 --requests 256 --prompt-len 128 --max-tokens 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads by name (Linux /proc; {} elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    names = {t.native_id: t.name for t in threading.enumerate()}
    try:
        for tid in os.listdir("/proc/self/task"):
            name = names.get(int(tid), "other")
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return {}
    return out


class StandInTokens:
    """A step's tokens as the modelled device delivers them: `get` waits (GIL released, as a CUDA
    event's wait) until the modelled device is done, then reads the engine's own tokens."""

    def __init__(self, tokens, ready: float):
        self.tokens, self.ready = tokens, ready

    def get(self) -> list[int]:
        wait = self.ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.tokens.get()


class StandInNet:
    """The model's forward, replaced: hidden states of the right shape (zeros) and logits that pick
    `token`, so the engine's own code (slots, blocks, prefix cache, sampling) runs around it."""

    def __init__(self, net, hidden_size: int, vocab_size: int, token: int):
        self.net, self.hidden_size, self.vocab_size, self.token = net, hidden_size, vocab_size, token

    def __getattr__(self, name):  # what the engine reads of the network (cache specs, graph safety)
        return getattr(self.net, name)

    def __call__(self, x, positions, ctx=None):
        return torch.zeros(*x.shape, self.hidden_size)

    def compute_logits(self, hidden):
        logits = hidden.new_zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


class StandInDevice:
    """Runs an Engine's decode and extend as they are, on a stand-in forward, and gives their tokens
    the modelled device's timing: work queues as on one stream, each step or chunk ready its modelled
    time after the one before."""

    def __init__(self, engine, decode_ms_1: float, decode_ms_n: float, n: int, prefill_us: float,
                 chunk_ms: float, token: int = 7):
        self.engine = engine
        self.decode_ms_1, self.decode_ms_n, self.n = decode_ms_1, decode_ms_n, n
        self.prefill_us, self.chunk_ms = prefill_us, chunk_ms
        self.free_at = time.perf_counter()  # when the modelled device finishes what is queued
        self.rows: list[int] = []  # rows of each decode step
        self.work: list[tuple[float, float]] = []  # (start, end) of each queued step or chunk
        config = engine.model.config
        engine.net = StandInNet(engine.net, config.hidden_size, config.vocab_size, token)
        self._decode, self._extend = engine.decode, engine.extend
        engine.decode, engine.extend = self.decode, self.extend

    def busy_within(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.work)

    def _queue(self, seconds: float) -> float:
        start = max(self.free_at, time.perf_counter())
        self.free_at = start + seconds
        self.work.append((start, self.free_at))
        return self.free_at

    def decode(self, slots, params, generator=None):
        b = len(slots)
        tokens = self._decode(slots, params, generator)
        self.rows.append(b)
        ms = self.decode_ms_1 + (self.decode_ms_n - self.decode_ms_1) * (b - 1) / max(1, self.n - 1)
        return StandInTokens(tokens, self._queue(ms / 1000))

    def extend(self, slot, ids, params=None, generator=None, sample_next=True, on_hidden=None):
        tokens = self._extend(slot, ids, params, generator, sample_next=sample_next, on_hidden=on_hidden)
        ready = self._queue(self.chunk_ms / 1000 + len(ids) * self.prefill_us / 1e6)
        return None if tokens is None else StandInTokens(tokens, ready)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=64, help="--max-num-seqs of the server (KV-cache slots)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--rates", default="inf")
    p.add_argument("--clients", type=int, default=4, help="client processes (benchmarks/serve.py --clients)")
    p.add_argument("--decode-ms-1", type=float, default=4.1, help="modelled decode step at batch 1 (ms)")
    p.add_argument("--decode-ms-n", type=float, default=9.35, help="modelled decode step at batch --seqs (ms)")
    p.add_argument("--prefill-us", type=float, default=32.0, help="modelled prefill time a prompt token (us)")
    p.add_argument("--chunk-ms", type=float, default=0.5, help="modelled fixed cost of a prompt chunk (ms)")
    p.add_argument("--prefix-probe", action="store_true", help="also serve.py's prefix probe (2k-token shared prefix)")
    p.add_argument("--profile", action="store_true", help="yappi CPU-time profile of the server's threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import uvicorn

    from lowbit import synthetic
    from lowbit.commands.serve import _listen
    from lowbit.generate import CHUNK_SIZE
    from lowbit.serve import create_app

    model = synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, seed=0)
    max_len = max(args.prompt_len + args.max_tokens, 2048 + 16 if args.prefix_probe else 0) + 16
    app = create_app(model, "tiny", max_batch=args.seqs, max_len=max_len)
    device = StandInDevice(app.state.service.worker.engine, args.decode_ms_1, args.decode_ms_n, args.seqs,
                           args.prefill_us, args.chunk_ms)
    sock = _listen("127.0.0.1", 0)  # the CLI's listening socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    bench_tok_s = args.seqs / (args.decode_ms_n / 1000)
    if args.profile:
        import yappi
        yappi.set_clock_type("cpu")
        yappi.start()
    device.rows.clear()
    device.work.clear()
    t0, cpu0, threads0 = time.perf_counter(), time.process_time(), thread_cpu()
    client = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "serve.py"), "--url", url, "--rates", args.rates,
         "--requests", str(args.requests), "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
         "--clients", str(args.clients), "--bench-tok-s", str(bench_tok_s)]
        + (["--prefix-probe", "--prefix-len", "2048"] if args.prefix_probe else []), capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    threads = {k: round((v - threads0.get(k, 0.0)) / wall, 3) for k, v in thread_cpu().items()}
    if args.profile:
        yappi.stop()
    server.should_exit = True
    thread.join(timeout=10)
    if client.returncode:
        print(client.stdout, client.stderr, file=sys.stderr)
        return 1
    lines = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    rates = [d for d in lines if "rate" in d]
    probe = next((d for d in lines if "prefix_len" in d), None)
    rows = device.rows
    # the best this workload allows against bench: its decode steps full, plus its prompts' chunks
    decode_s = args.requests * args.max_tokens / args.seqs * args.decode_ms_n / 1000
    chunks = -(-args.prompt_len // CHUNK_SIZE)
    prefill_s = args.requests * (chunks * args.chunk_ms / 1000 + args.prompt_len * args.prefill_us / 1e6)
    out = {"host_cpus": os.cpu_count(), "seqs": args.seqs, "modelled_bench_tok_s": round(bench_tok_s, 1),
           "workload_ceiling_vs_bench": round(decode_s / (decode_s + prefill_s), 3),
           "decode_steps": len(rows), "mean_rows": round(sum(rows) / max(1, len(rows)), 1),
           # per rate: how busy the modelled device was between the clients' first send and last token
           "device_busy_share": [round(device.busy_within(r["start_clock"], r["start_clock"] + r["wall_s"])
                                       / r["wall_s"], 3) for r in rates],
           "server_cpu_share": round(cpu / wall, 3),  # all its threads; one GIL: near 1 is its ceiling
           "thread_cpu_share": {k: v for k, v in threads.items() if v >= 0.005},
           "rates": rates} | ({"prefix_probe": probe} if probe else {})
    print(json.dumps(out, indent=1))
    if args.profile:
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        stats.print_all(columns={0: ("name", 60), 1: ("ncall", 9), 2: ("tsub", 8), 3: ("ttot", 8)}, out=sys.stdout)
        for t in yappi.get_thread_stats():
            print(f"thread {t.name:<24} cpu {t.ttot:8.3f} s  switches {t.sched_count}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
