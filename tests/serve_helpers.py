"""Shared by the tests of `lowbit serve`: a tiny chat model built in seconds (a random Llama with
lowbit demo's BPE tokenizer and a chat template), a real uvicorn server on a loopback port, and the
real `openai` client.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import openai
import pytest
import uvicorn

import lowbit
from lowbit import demo
from lowbit.commands.serve import _listen
from lowbit.serve import create_app
from tiny_models import make_tiny

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MAX_LEN = 256
PROMPTS = ["The kettle had been", "Once upon a time", "She said", "A"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "tiny-chat"
    tok = demo.build_tokenizer(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    make_tiny(path, vocab_size=len(tok), max_position_embeddings=MAX_LEN, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    """The reference: Model.generate on its own copy of the checkpoint."""
    return lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)


def wait_until(condition, seconds: float) -> None:
    """Poll `condition` until it holds; fail the test if it does not within `seconds`."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"not within {seconds} s"
        time.sleep(0.005)


@contextmanager
def serving(app, on_fatal_exits: bool = True):
    """`app` under uvicorn on a free loopback port, in a background thread; yields the base URL."""
    sock = _listen("127.0.0.1", 0)  # the CLI's listening socket (TCP_NODELAY on its connections)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if on_fatal_exits:  # as the CLI does: a dead worker stops the server
        app.state.service.worker.on_fatal = lambda error: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir):
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=4, max_len=MAX_LEN)
    with serving(app) as url:
        yield url, app.state.service


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def error_of(call, status):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread: the server's worker, uvicorn and the client threads share 2 busy cores,
    where a 2-thread GEMM of a tiny model waits on the other thread far longer than it computes."""
    import torch

    torch.set_num_threads(1)
    yield
