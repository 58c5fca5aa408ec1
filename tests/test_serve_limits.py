"""`lowbit serve` under bad input and load: the body limit, the prompt-length bound checked before
tokenizing, tokenization off the event loop, the request timeout, the bounded queue, input
validation (each input that gave a 500 before), error bodies without server paths or exception
texts, 400 (never 422) in answers and in the OpenAPI schema, keep-alive kept after errors, and a
worker that dies (/health 503, requests refused at once, the server stops).
"""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import lowbit
from lowbit.serve import create_app
from lowbit.serve.app import DEFAULT_MAX_BODY
from serve_helpers import MAX_LEN, error_of, model_dir, one_thread, ref, serving, wait_until  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def limited(model_dir):
    """max_batch 2, max_queue 1: a third concurrent sequence gets a 429."""
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=2, max_len=MAX_LEN, max_queue=1)  # the default body limit: 4 MiB
    with serving(app) as url:
        yield url, app.state.service


@pytest.fixture
def client(limited):
    return openai.OpenAI(base_url=limited[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, path, body, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)  # json.dumps writes NaN, Infinity
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def slow_steps(monkeypatch, service, seconds):
    decode = service.worker.engine.decode

    def slow(*args):
        time.sleep(seconds)
        return decode(*args)

    monkeypatch.setattr(service.worker.engine, "decode", slow)


# ---------------------------------------------------------------- sizes
def test_body_limit_is_413(limited):
    url, _ = limited
    with httpx.Client(timeout=60) as http:  # the refused body is drained: the connection stays usable
        r = http.post(url + "/v1/completions", json={"prompt": "x" * DEFAULT_MAX_BODY, "max_tokens": 1})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "connection" not in r.headers
        assert http.get(url + "/health").status_code == 200

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(DEFAULT_MAX_BODY // 2**20 + 1):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(url + "/health").status_code == 200


def test_prompt_length_is_checked_before_tokenizing(limited, monkeypatch):
    url, service = limited
    calls = []
    tok = service.model.tokenizer
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or {"input_ids": [1]})
    long = "word " * (service.max_chars // 5 + 1)
    for body in ({"prompt": long}, {"prompt": ["a", long]}, {"messages": [{"role": "user", "content": long}]}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = post(url, path, body | {"max_tokens": 1})
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text
    r = post(url, "/v1/completions", {"prompt": list(range(MAX_LEN + 1)), "max_tokens": 1})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert calls == []


def _stream_gaps(client, during, monkeypatch, service):
    """Stream a long completion (a step every >= 20 ms, so that it outlasts `during`); call
    `during()` once 5 tokens arrived; return the gaps between chunks that arrived while `during`
    ran, and the median gap of the others."""
    slow_steps(monkeypatch, service, 0.02)
    times, window = [], []
    stream = client.completions.create(model="tiny-chat", prompt="A", max_tokens=MAX_LEN - 8, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    worker = None
    for _ in stream:
        times.append(time.monotonic())
        if len(times) == 5:
            def run():
                window.append(time.monotonic())
                during()
                window.append(time.monotonic())
            worker = threading.Thread(target=run)
            worker.start()
        if len(window) == 2 and len(times) >= 10 and times[-10] > window[1]:
            break  # enough tokens after it: stop early (the server cancels the rest)
    worker.join()
    stream.close()
    assert window[1] < times[-1], "the stream ended before the big request was answered: make it longer"
    pairs = list(zip(times, times[1:]))
    inside = [b - a for a, b in pairs if b >= window[0] and a <= window[1]]
    outside = sorted(b - a for a, b in pairs if not (b >= window[0] and a <= window[1]))
    assert inside
    return max(inside), outside[len(outside) // 2], outside[-1]


def on_schedule(worst: float, median: float, noise: float) -> bool:
    """The worst gap while the big request ran is within 100 ms of the usual one, or no worse than
    the worst gap without it (a busy shared CI machine stalls a process now and then by itself)."""
    return worst < max(median + 0.1, noise)


SEND_10MB = """
import json, sys, httpx
body = json.dumps({"prompt": "word " * (2 * 2**20), "max_tokens": 4}).encode()
print("ready", flush=True)
sys.stdin.readline()  # go
r = httpx.post(sys.argv[1] + "/v1/completions", content=body, headers={"content-type": "application/json"},
               timeout=60)
print(r.status_code, flush=True)
"""


def test_a_10mb_prompt_does_not_stall_a_running_stream(limited, client, monkeypatch):
    """The 10 MB prompt comes from another process (as from another client machine), started
    before the stream: only the server's own work on it can delay the stream. The sender competes
    for this machine's 2 busy cores, so a run that misses the schedule is tried once more (a real
    stall misses it every time)."""
    url, service = limited
    for tries_left in (1, 0):
        sender = subprocess.Popen([sys.executable, "-c", SEND_10MB, url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert sender.stdout.readline().strip() == "ready"
            answers = []

            def send():
                sender.stdin.write("go\n")
                sender.stdin.flush()
                answers.append(sender.stdout.readline().strip())

            gaps = _stream_gaps(client, send, monkeypatch, service)
        finally:
            sender.kill()
            sender.wait()
        assert answers == ["413"]  # refused on its Content-Length: never parsed
        if on_schedule(*gaps) or not tries_left:
            break
    assert on_schedule(*gaps), gaps


def test_tokenizing_runs_off_the_event_loop(limited, client, monkeypatch):
    """A prompt that takes 1.5 s to tokenize (here: a slowed tokenizer) does not delay a stream."""
    url, service = limited
    tok = service.model.tokenizer
    encode = type(tok).__call__

    def slow(self, *a, **k):
        time.sleep(1.5)
        return encode(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", slow)
    for tries_left in (1, 0):  # as above: a miss is tried once more, a real stall misses every time
        answers = []
        with httpx.Client(timeout=60) as http:  # made before: creating a client costs ~0.2 s of this process
            gaps = _stream_gaps(client, lambda: answers.append(
                http.post(url + "/v1/completions", json={"prompt": "slow to tokenize", "max_tokens": 2})),
                monkeypatch, service)
        assert answers[0].status_code == 200
        if gaps[0] < 0.75 or not tries_left:
            break
    # tokenizing on the event loop would hold every stream for the whole 1.5 s; a gap well under that
    # (not a latency target: the 2 cores are shared with the sender) shows it ran elsewhere
    assert gaps[0] < 0.75, gaps


# ---------------------------------------------------------------- queue and timeout
def test_queue_full_is_429_and_frees_up(limited, client, monkeypatch):
    url, service = limited
    slow_steps(monkeypatch, service, 0.02)
    started = []

    def long_request():
        started.append(1)
        client.completions.create(model="tiny-chat", prompt="A", max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=long_request) for _ in range(3)]  # 2 slots + 1 waiting: full
    for t in threads:
        t.start()
    wait_until(lambda: service.worker.outstanding >= 3, 20)
    r = post(url, "/v1/completions", {"prompt": "B", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    r = post(url, "/v1/completions", {"prompt": ["B", "C"], "max_tokens": 2, "n": 3})  # 6 > capacity 3: never fits
    assert r.status_code == 400 and "capacity" in r.json()["error"]["message"]
    for t in threads:
        t.join()
    assert service.worker.outstanding == 0
    assert post(url, "/v1/completions", {"prompt": "B", "max_tokens": 2}).status_code == 200


def test_request_timeout(model_dir, monkeypatch):
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=2, max_len=MAX_LEN, request_timeout=0.3)
    service = app.state.service
    slow_steps(monkeypatch, service, 0.02)
    with serving(app) as url:
        body = {"prompt": "A", "max_tokens": 100, "ignore_eos": True}
        r = post(url, "/v1/completions", body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        wait_until(lambda: service.worker.engine.free_slots >= 2, 10)  # the timed-out sequences were cancelled
        assert post(url, "/v1/completions", {"prompt": "A", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------- validation
def test_inputs_that_gave_500s_are_400s(limited, client, ref):
    url, _ = limited
    kw = dict(model="tiny-chat", prompt="Hi", max_tokens=3)
    for seed in (2**64, -2**63 - 1):
        e = error_of(lambda: client.completions.create(**kw, temperature=0.8, seed=seed), 400)
        assert e["param"] == "seed"
    for seed in (2**64 - 1, -2**63, -1):  # the edges of the 64-bit ranges work
        assert client.completions.create(**kw, temperature=0.8, seed=seed).choices[0].finish_reason
    for body, param in [({"prompt": "a\ud800b"}, "prompt"), ({"prompt": ["ok", "\udfff"]}, "prompt[1]"),
                        ({"model": "x\ud800"}, "model"), ({"stop": ["\ud800"]}, "stop[0]")]:
        r = post(url, "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2} | body))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "surrogate" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "\ud83d"}]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = post(url, "/v1/completions", b'{"prompt": "\xff\xfe bad utf-8"}')
    assert r.status_code == 400
    for t in (math.nan, math.inf, -math.inf, -0.5, 2.5):
        r = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": t})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", (t, r.text)
    for field, value in [("top_p", 0), ("top_p", 1.5), ("top_p", math.nan), ("min_p", -0.1), ("min_p", math.inf),
                         ("presence_penalty", 3), ("frequency_penalty", math.nan), ("repetition_penalty", 0),
                         ("top_k", -2), ("n", 0), ("logprobs", 21), ("min_tokens", -1), ("stop_token_ids", [10**6])]:
        r = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
    # a tiny temperature samples greedily (logits / 1e-40 would overflow into <unk> tokens)
    want = ref.generate(["Hi"], max_new_tokens=6, ignore_eos=True)[0].output_ids
    r = client.completions.create(**kw | {"max_tokens": 6}, temperature=1e-40,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want


def test_unknown_fields_are_refused_by_name(limited, client):
    url, _ = limited
    for path, body, field in [
        ("/v1/completions", {"prompt": "Hi", "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"prompt": "Hi", "chat_template_kwargs": {}}, "chat_template_kwargs"),
        ("/v1/completions", {"prompt": "Hi", "use_beam_search": True}, "use_beam_search"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "Hi", "stream": True, "stream_options": {"continuous": True}},
         "stream_options.continuous"),
    ]:
        r = post(url, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert f"'{field}' is not a field" in r.json()["error"]["message"]
    for path, body, field in [  # declared, refused unless neutral
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": 1.0}}, "logit_bias"),
        ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ]:
        r = post(url, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # the allow-list: fields that label a request and cannot change it
    r = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=2, user="me",
                                  extra_body={"metadata": {"k": "v"}})
    assert r.choices[0].finish_reason


def test_errors_are_400_not_422_in_the_schema(limited):
    url, _ = limited
    schema = httpx.get(url + "/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"])
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert {"413", "429", "503"} <= set(responses)


def test_errors_keep_the_connection_and_leak_nothing(limited, monkeypatch):
    url, service = limited

    def broken(*a):
        raise RuntimeError(f"secret failure in {service.model.path}")

    monkeypatch.setattr(service, "check", broken)
    host, port = url.removeprefix("http://").split(":")
    body = b'{"prompt": "Hi", "max_tokens": 1}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    bad = b'{"prompt": "Hi", "temperature": NaN}'
    invalid = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(bad), bad))
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        f = conn.makefile("rb")
        for req, status in [(request, 500), (invalid, 400), (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                            (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200)]:
            conn.sendall(req)  # all on one connection: no error closed it
            head = f.readline()
            assert head.split()[1] == str(status).encode(), head
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = f.read(length).decode()
            assert "secret" not in answer and str(service.model.path) not in answer and "Traceback" not in answer
            if status == 500:
                assert "reference" in json.loads(answer)["error"]["message"]


# ---------------------------------------------------------------- the worker
def test_a_dead_worker_answers_503_and_stops_the_server(model_dir, monkeypatch):
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=2, max_len=64)
    worker = app.state.service.worker
    with serving(app, on_fatal_exits=False) as url:
        assert httpx.get(url + "/health").status_code == 200
        slow_steps(monkeypatch, app.state.service, 0.01)

        def die(*a):
            raise RuntimeError("the scheduler broke")

        monkeypatch.setattr(worker.metrics, "scheduler", die)  # runs outside a decode step: fatal
        t0 = time.monotonic()
        r = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 20})
        assert r.status_code == 503 and time.monotonic() - t0 < 10  # its request: failed, not hung
        assert r.json()["error"]["code"] == "worker_not_running"
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and "the scheduler broke" in h.json()["error"]["message"]
        t0 = time.monotonic()
        r = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 503 and time.monotonic() - t0 < 5  # refused at once, no 200-then-hang
    # as the CLI wires it, the death stops the server
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=2, max_len=64)
    with serving(app) as url:
        monkeypatch.setattr(app.state.service.worker.metrics, "scheduler", die)
        post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        deadline = time.time() + 10
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.TransportError:
                break
            assert time.time() < deadline, "the server kept running with a dead worker"
            time.sleep(0.05)


def test_a_worker_that_cannot_start_fails_the_start_up(model_dir, monkeypatch):
    import uvicorn

    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=1, max_len=32)
    worker = app.state.service.worker
    worker.cuda_index = 0  # as on a GPU: the thread selects the model's device first

    def no_device(index):
        raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{index}")

    monkeypatch.setattr("torch.cuda.set_device", no_device)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    with socket.socket() as sock, pytest.raises(SystemExit):  # uvicorn's exit on a failed start-up
        sock.bind(("127.0.0.1", 0))
        server.run(sockets=[sock])
    assert not server.started
    assert worker.error.startswith("ValueError: Expected a torch.device")
