"""Load benchmark of a running `lowbit serve` (or any OpenAI-compatible server): Poisson arrivals at
several request rates, each request a real streaming `openai` client; reports per rate the output
throughput, TTFT and inter-token latency p50/p99, and errors. `--prefix-probe` measures the TTFT of
a prompt that repeats a long shared prefix (a 2k-token system prompt) cold and warm, which is what
prefix caching should cut.

Prompts are random token ids (synthetic models have no tokenizer), so lengths are exact.

  lowbit serve --synthetic llama-3-8b --scheme nvfp4 --max-num-seqs 64 &
  python benchmarks/serve.py --url http://127.0.0.1:8000 --rates 4,8,16,inf --requests 256 \
      --prompt-len 512 --max-tokens 128 --clients 4 --prefix-probe --json serve.json

CPU smoke run (tiny model; tests/test_serve_bench.py does this):
  lowbit serve --synthetic tiny --device cpu --dtype float32 --max-model-len 256 --port 8123 &
  python benchmarks/serve.py --url http://127.0.0.1:8123 --rates 4,inf --requests 8 --prompt-len 16 \
      --max-tokens 8 --prefix-probe --prefix-len 128
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import math
import random
import subprocess
import sys
import time


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# When this task's request left the client: the openai client spends time proportional to the
# prompt building the request (~30 us a token id in its type-driven transform), which is the
# client's, not the server's; TTFT counts from the send (httpx's request hook), `ttft_call` from the
# call.
SENT: contextvars.ContextVar[float | None] = contextvars.ContextVar("sent", default=None)


async def _mark_sent(request) -> None:
    SENT.set(time.perf_counter())


async def one_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; times of its first token and of every later one (return_token_ids:
    a chunk per token, also from a model without a tokenizer, whose chunks have no text)."""
    start = time.perf_counter()
    SENT.set(None)
    times, tokens = [], 0
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            if chunk.choices:
                times.append(time.perf_counter())
            elif chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - every failure is a counted error, with its kind
        cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__)[:200]})" if e.__cause__ else ""
        return {"error": f"{type(e).__name__}: {str(e)[:200]}{cause}"}
    sent = SENT.get() or start
    return {"ttft": times[0] - sent if times else None, "ttft_call": times[0] - start if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens, "end": time.perf_counter()}


def make_client(url: str, api_key: str, timeout: float):
    import httpx
    import openai

    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=timeout,
                              http_client=httpx.AsyncClient(
                                  limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                  timeout=timeout, event_hooks={"request": [_mark_sent]}))


async def drive(url: str, api_key: str, timeout: float, model: str, rate: float, prompts: list[list[int]],
                max_tokens: int, seed: int) -> dict:
    """Send `prompts` with exponential gaps of mean 1/rate (rate inf: all at once) from this process;
    the per-request results, when it started and how much CPU it used."""
    client, rng = make_client(url, api_key, timeout), random.Random(seed)
    tasks = []
    cpu, start = time.process_time(), time.perf_counter()
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(one_request(client, model, prompt, max_tokens)))
        if math.isfinite(rate) and i + 1 < len(prompts):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    await client.close()
    return {"results": results, "start": start, "cpu_share": cpu / wall if wall > 0 else None}


def drive_in_processes(jobs: list[dict]) -> list[dict]:
    """Each job in its own client process (`serve.py --client-process`, job on stdin, result on
    stdout): one Python process parsing thousands of stream chunks a second is itself a limit.
    perf_counter is the system's monotonic clock, so the processes' times compare."""
    procs = [subprocess.Popen([sys.executable, __file__, "--client-process"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in jobs]
    for proc, job in zip(procs, jobs):  # all started (imports done while they wait on stdin)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    parts = []
    for proc in procs:
        out = proc.stdout.read()
        if proc.wait():
            raise RuntimeError(f"a client process failed (exit {proc.returncode})")
        parts.append(json.loads(out))
    return parts


async def run_rate(args, model: str, rate: float, requests: int, max_tokens: int, rng: random.Random) -> dict:
    """`requests` requests at `rate` per second in all, spread over --clients processes."""
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_len)] for _ in range(requests)]
    n = max(1, min(args.clients, requests))
    jobs = [dict(url=args.url, api_key=args.api_key, timeout=args.timeout, model=model, rate=rate / n,
                 prompts=prompts[i::n], max_tokens=max_tokens, seed=rng.randrange(2**32)) for i in range(n)]
    served = await server_tokens(args.url)
    if n == 1:
        parts = [await drive(**jobs[0])]
    else:
        parts = await asyncio.to_thread(drive_in_processes, jobs)
    served = None if served is None else (await server_tokens(args.url) or 0) - served
    results = [r for p in parts for r in p["results"]]
    start = min(p["start"] for p in parts)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    wall = max((r["end"] for r in ok), default=time.perf_counter()) - start
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    shares = [p["cpu_share"] for p in parts if p["cpu_share"] is not None]
    return {"rate": rate, "requests": requests, "ok": len(ok), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5], "wall_s": round(wall, 3),
            "start_clock": start,  # time.perf_counter() at the first send (the system's monotonic clock)
            "output_tok_s": round(tokens / wall, 1) if wall > 0 else None, "req_s": round(len(ok) / wall, 2),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "ttft_call_p50_ms": ms(percentile([r["ttft_call"] for r in ok if r["ttft_call"] is not None], 50)),
            # the server's own count (/metrics) over the same wall time, and how busy the busiest client
            # process was (near 1.0: the clients, not the server, may be what limits the rate: add --clients)
            "server_tok_s": round(served / wall, 1) if served is not None and wall > 0 else None,
            "clients": n, "client_cpu_share": round(max(shares), 2) if shares else None,
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99))}


async def server_tokens(url: str) -> float | None:
    """lowbit_generation_tokens_total from the server's /metrics (None: not a lowbit server)."""
    try:
        import httpx

        async with httpx.AsyncClient() as http:
            r = await http.get(url.rstrip("/") + "/metrics")
        for line in r.text.splitlines():
            if line.startswith("lowbit_generation_tokens_total "):
                return float(line.split()[1])
    except Exception:  # noqa: BLE001 - optional: other servers have no such counter
        return None
    return None


async def prefix_probe(client, model: str, prefix_len: int, repeats: int, vocab: int, rng: random.Random) -> dict:
    """TTFT of prompts sharing a `prefix_len`-token prefix (a long system prompt): the first one
    (cold) and the median of the next `repeats` (warm, sent one at a time); and of unrelated prompts
    of the same length, for comparison."""
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    tail = lambda: [rng.randrange(3, vocab) for _ in range(16)]  # noqa: E731

    async def ttft(prompt):
        r = await one_request(client, model, prompt, 1)
        if "error" in r:
            raise RuntimeError(r["error"])
        return r["ttft"]

    cold = await ttft(prefix + tail())
    warm = [await ttft(prefix + tail()) for _ in range(repeats)]
    other = [await ttft([rng.randrange(3, vocab) for _ in range(prefix_len)] + tail()) for _ in range(repeats)]
    w, o = percentile(warm, 50), percentile(other, 50)
    return {"prefix_len": prefix_len, "cold_ttft_ms": round(cold * 1000, 2), "warm_ttft_p50_ms": round(w * 1000, 2),
            "unshared_ttft_p50_ms": round(o * 1000, 2), "speedup_vs_unshared": round(o / w, 2)}


async def main_async(args) -> dict:
    client = make_client(args.url, args.api_key, args.timeout)
    models = await client.models.list()
    model = args.model or models.data[0].id
    rng = random.Random(args.seed)
    out = {"url": args.url, "model": model, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
           "rates": []}
    await run_rate(args, model, math.inf, min(2, args.requests), 2, rng)  # warm-up
    for rate in args.rates:
        res = await run_rate(args, model, rate, args.requests, args.max_tokens, rng)
        if args.bench_tok_s:
            res["vs_bench_decode"] = round(res["output_tok_s"] / args.bench_tok_s, 3)
        print(json.dumps(res), flush=True)
        if res["client_cpu_share"] is not None and res["client_cpu_share"] > 0.7:
            print(f"serve.py: a client process was busy {res['client_cpu_share']:.0%} of the time: the clients may "
                  f"limit this rate; try --clients {2 * res['clients']}", file=sys.stderr)
        out["rates"].append(res)
    if args.prefix_probe:
        out["prefix_probe"] = await prefix_probe(client, model, args.prefix_len, args.prefix_repeats, args.vocab, rng)
        print(json.dumps(out["prefix_probe"]), flush=True)
    await client.close()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--rates", default="1,4,inf", help="requests per second, comma-separated; inf: all at once")
    p.add_argument("--requests", type=int, default=64, help="requests per rate")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    p.add_argument("--clients", type=int, default=1,
                   help="client processes sharing the requests (and the rate): one Python process parses a few "
                        "thousand stream chunks a second at most")
    p.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn from [3, vocab)")
    p.add_argument("--bench-tok-s", type=float, help="`lowbit bench` aggregate decode tok/s to compare with")
    p.add_argument("--prefix-probe", action="store_true", help="measure TTFT of a repeated long shared prefix")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--prefix-repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    return args


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--client-process"]:  # one of --clients' processes
        print(json.dumps(asyncio.run(drive(**json.load(sys.stdin)))))
        return 0
    args = parse_args(argv)
    out = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if any(r["errors"] for r in out["rates"]) else 0


if __name__ == "__main__":
    sys.exit(main())
