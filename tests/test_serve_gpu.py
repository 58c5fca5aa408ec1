"""`lowbit serve` on a GPU (the server had never run there: its worker died at start-up on a device
`cuda` without an index). The real server streams to the real openai client, from a synthetic
model in bf16 and NVFP4, from a real checkpoint, and from the `lowbit serve` command itself; the
streamed tokens equal Model.generate's. Part of benchmarks/gpu_check.sh (it runs tests/).
"""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

import lowbit
from conftest import fixture_dir, requires_cuda
from lowbit import synthetic
from lowbit.serve import create_app
from serve_helpers import serving

pytestmark = requires_cuda
PROMPT = [5, 17, 300, 42, 7, 99]


def stream_ids(url: str, name: str, prompt, n: int) -> tuple[list[int], str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids, text = [], []
    for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "return_token_ids": True}):
        ids += chunk.choices[0].model_extra["token_ids"]
        text.append(chunk.choices[0].text)
    return ids, "".join(text)


@pytest.mark.parametrize("scheme", ["bf16", "nvfp4"])
def test_synthetic_model_streams_on_the_gpu(scheme):
    model = synthetic.build("small", scheme, device="cuda")
    assert model.device == torch.device("cuda") and model.device.index is None  # what broke the worker
    want = model.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0].output_ids
    app = create_app(model, "small", max_batch=4, max_len=256)
    with serving(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert stream_ids(url, "small", PROMPT, 16)[0] == want


def test_checkpoint_streams_text_on_the_gpu():
    model = lowbit.load(fixture_dir("base-llama-bf16"), device="cuda", progress=False)
    want = model.generate(["The kettle had been"], max_new_tokens=12, ignore_eos=True)[0]
    app = create_app(model, "llama", max_batch=4, max_len=128)
    with serving(app) as url:
        ids, text = stream_ids(url, "llama", "The kettle had been", 12)
    assert ids == want.output_ids and text == want.text


def test_cli_serves_on_the_gpu():
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", "--synthetic", "small", "--scheme", "nvfp4",
                             "--port", "0", "--max-model-len", "256"], stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        assert banner.startswith("lowbit serve: 'small' on http://127.0.0.1:"), banner
        url = banner.split()[4].removesuffix("/v1")
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        ids, _ = stream_ids(url, "small", PROMPT, 8)
        assert len(ids) == 8
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
