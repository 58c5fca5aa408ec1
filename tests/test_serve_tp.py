"""`lowbit serve --tp 2` (a real subprocess on loopback, the real `openai` client): two gloo ranks
on CPU, and on a machine with 2 GPUs two NCCL ranks too. Rank 0 serves and samples, rank 1 follows
every step. Greedy and seeded tokens, prompt logprobs (echo) and a prefix-cache hit equal tp=1's; a
killed rank 1 takes the server down with a message naming it, within seconds; Ctrl-C stops every
rank gracefully."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from lowbit import synthetic

ARGS = ["--synthetic", "tiny", "--dtype", "float32", "--max-num-seqs", "4", "--max-model-len", "128"]
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 77], list(range(10, 50))]  # the last one twice: a prefix-cache hit


CPU = {"CUDA_VISIBLE_DEVICES": ""}  # gloo ranks even where GPUs are
DEVICES = ["cpu", pytest.param("cuda", id="nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))]


def start(tp: int, env: dict = CPU):
    """`lowbit serve --tp` in a subprocess: (process, client, pids of the ranks). The ranks end with it."""
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", *ARGS, "--port", "0", "--tp", str(tp)],
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"} | env)
    try:
        banner = proc.stderr.readline()
        assert banner.startswith("lowbit serve: 'tiny' on http://127.0.0.1:"), banner + proc.stderr.read()
        assert f"tensor-parallel over {tp} ranks" in banner, banner
        pids = [int(p) for p in re.search(r"pids ([\d, ]+)\)", banner).group(1).split(", ")]
        client = openai.OpenAI(base_url=banner.split()[4], api_key="unused", max_retries=0, timeout=60)
        deadline = time.time() + 30
        while True:  # the banner comes just before uvicorn accepts
            try:
                client.models.list()
                return proc, client, pids
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, "the server did not start accepting"
                time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise


def stop(proc, pids) -> None:
    """Whatever happened, leave no process behind (the ranks hold the stderr pipe too)."""
    for pid in [proc.pid] + pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode is None:
        proc.communicate(timeout=30)


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_serve_tp2_equals_tp1_and_a_dead_rank_stops_it(device):
    tp1 = synthetic.build("tiny", "bf16", device=device, dtype=torch.float32)
    proc, client, pids = start(2, CPU if device == "cpu" else {})
    try:
        def greedy(prompt):
            r = client.completions.create(model="tiny", prompt=[prompt], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            return r.choices[0].model_extra["token_ids"]

        with ThreadPoolExecutor(3) as pool:  # concurrent: they share decode steps
            got = list(pool.map(greedy, PROMPTS))
        want = [r.output_ids for r in tp1.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)]
        assert got == want
        assert greedy(PROMPTS[2]) == want[2]  # its first 32 tokens from the prefix cache, on both ranks
        # sampled on rank 0 alone: rank 1 must feed rank 0's tokens, not its own (greedy would not tell)
        r = client.completions.create(model="tiny", prompt=[PROMPTS[0]], max_tokens=10, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        sampled = tp1.generate([PROMPTS[0]], max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
        assert r.choices[0].model_extra["token_ids"] == sampled[0].output_ids
        # prompt logprobs, made in the prefill on both ranks (the logits are all-gathered)
        r = client.completions.create(model="tiny", prompt=[PROMPTS[2]], max_tokens=1, temperature=0, logprobs=1,
                                      echo=True)
        lp = torch.log_softmax(tp1.logits(torch.tensor(PROMPTS[2])[None])[0], dim=-1)
        want_lp = [float(lp[t - 1, PROMPTS[2][t]]) for t in range(1, len(PROMPTS[2]))]
        assert r.choices[0].logprobs.token_logprobs[1:len(PROMPTS[2])] == pytest.approx(want_lp, abs=1e-4)
        assert proc.poll() is None
        t0 = time.time()
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        left = alive(pids)
    finally:
        stop(proc, pids)
    assert proc.returncode == 2, err
    assert "lowbit serve: error: the server stopped: tensor-parallel run failed: rank(s) [1] died" in err, err
    assert time.time() - t0 < 20
    assert left == []  # no rank is left behind


def test_serve_tp2_stops_every_rank_on_ctrl_c():
    """SIGINT to the launcher: rank 0 shuts the server down gracefully and stops rank 1; exit 130."""
    proc, client, pids = start(2)
    try:
        assert client.completions.create(model="tiny", prompt=[PROMPTS[1]], max_tokens=2).usage.completion_tokens
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        left = alive(pids)
    finally:
        stop(proc, pids)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Application shutdown complete" in err
    assert left == []
