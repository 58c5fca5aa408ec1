"""`lowbit serve`: a real uvicorn server on a loopback port, queried with the real `openai` client.

The model is built here in seconds (a tiny random Llama with lowbit demo's BPE tokenizer and a chat
template), so the tests need no fixtures. Every answer is compared with `Model.generate` on a
second, independently loaded copy of the same checkpoint.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import lowbit
from lowbit import synthetic
from lowbit.cli import main as cli_main
from lowbit.serve import create_app
from serve_helpers import (MAX_LEN, PROMPTS, client, error_of, model_dir, one_thread, ref, server,  # noqa: F401
                           serving, wait_until)

pytestmark = pytest.mark.usefixtures("one_thread")

def greedy(ref, prompt, n, **kwargs):
    return ref.generate([prompt], max_new_tokens=n, **kwargs)[0]


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


# ---------------------------------------------------------------- answers equal Model.generate
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    r = httpx.get(server[0] + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_greedy_completion_equals_generate(client, ref, ignore_eos):
    for prompt in PROMPTS:
        want = greedy(ref, prompt, 12, ignore_eos=ignore_eos)
        r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": ignore_eos})
        c = r.choices[0]
        assert (c.text, ids_of(c)) == (want.text, want.output_ids)
        assert c.finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert r.model_extra["prompt_token_ids"] == want.prompt_ids
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(want.prompt_ids), len(want.output_ids), len(want.prompt_ids) + len(want.output_ids))


def test_token_id_prompt(client, ref):
    prompt = torch.randint(3, ref.config.vocab_size, (9,)).tolist()
    want = greedy(ref, prompt, 8, ignore_eos=True)
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    assert ids_of(r.choices[0]) == want.output_ids
    assert r.choices[0].text == ref.decode(want.output_ids)


def test_chat_equals_generate_on_the_templated_prompt(client, ref):
    want = greedy(ref, "Hello there", 10, chat=True, ignore_eos=True)
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=10, temperature=0, extra_body={"return_token_ids": True,
                                                                                 "ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, ids_of(r.choices[0])) == (want.text, want.output_ids)
    assert r.usage.prompt_tokens == len(want.prompt_ids) and r.choices[0].finish_reason == "length"
    # a whole conversation, with content given as text parts
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tea?"}]
    prompt = ref.encode_chat(messages)
    want = greedy(ref, prompt, 6, ignore_eos=True)
    messages[-1]["content"] = [{"type": "text", "text": "Te"}, {"type": "text", "text": "a?"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=6,
                                       temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.model_extra["prompt_token_ids"] == prompt and ids_of(r.choices[0]) == want.output_ids


def test_streaming_concatenates_to_the_whole_answer(client):
    kw = dict(model="tiny-chat", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=PROMPTS[0], **kw)
    chunks = list(client.completions.create(prompt=PROMPTS[0], stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me"}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions",
                      json={"prompt": "A", "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_stop_strings_and_max_tokens(client, ref):
    """Stop strings anywhere in the text (inside a token or across tokens), given as a string or a
    list: the answer ends before the first one, streamed or not."""
    text = greedy(ref, PROMPTS[1], 24, ignore_eos=True).text
    kw = dict(model="tiny-chat", prompt=PROMPTS[1], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    stops = [text[i:i + 3] for i in range(1, len(text) - 3, max(1, len(text) // 5))] + [["never", text[-2:]]]
    for stop in stops:
        first = min(text.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)
        r = client.completions.create(stop=stop, **kw)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:first], "stop"), stop
        chunks = list(client.completions.create(stop=stop, stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == text[:first], stop
        assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(**kw | {"max_tokens": 5})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_concurrent_requests_share_the_batch_and_get_their_own_tokens(server, client, ref, monkeypatch):
    """Six requests from six threads, greedy and seeded-sampled, of different lengths, through four
    slots: each gets exactly what it gets alone, though they ran in shared decode steps."""
    engine = server[1].worker.engine
    steps = []  # the temperatures of each decode step's rows
    decode = engine.decode

    def recording_decode(slots, params, generators):
        steps.append([p.temperature for p in params])
        return decode(slots, params, generators)

    monkeypatch.setattr(engine, "decode", recording_decode)
    jobs = [(p, n, 0.0) for p, n in zip(PROMPTS, (40, 25, 33, 18))] + [(PROMPTS[0], 30, 0.8), (PROMPTS[2], 20, 1.2)]
    want = [greedy(ref, p, n, temperature=t, seed=7, ignore_eos=True).output_ids for p, n, t in jobs]
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def ask(i):
        p, n, t = jobs[i]
        start.wait()
        r = client.completions.create(model="tiny-chat", prompt=p, max_tokens=n, temperature=t, seed=7,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        got[i] = ids_of(r.choices[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert any(0.0 in t and max(t) > 0 for t in steps), steps  # greedy and sampled rows in one step
    assert engine.free_slots == engine.num_slots


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_the_slot(server, monkeypatch, stream):
    url, service = server
    submitted = []
    submit = service.worker.submit
    monkeypatch.setattr(service.worker, "submit", lambda *a: submitted.append(submit(*a)) or submitted[-1])
    body = json.dumps({"prompt": "A", "max_tokens": MAX_LEN - 8, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 30
    while not (submitted and submitted[0].seq.out):
        assert time.time() < deadline
        time.sleep(0.005)
    conn.close()  # gone mid-generation
    seq = submitted[0].seq
    while seq.slot >= 0:
        assert time.time() < deadline
        time.sleep(0.005)
    assert seq.finish == "cancelled" and len(seq.out) < MAX_LEN - 8
    assert service.worker.engine.free_slots == service.worker.engine.num_slots


# ---------------------------------------------------------------- errors
def test_errors_in_openai_format(client, server):
    def complete(**kw):
        return lambda: client.completions.create(**({"model": "tiny-chat", "prompt": "Hi", "temperature": 0} | kw))

    def chat(**kw):
        return lambda: client.chat.completions.create(
            **({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]} | kw))

    e = error_of(complete(prompt="word " * MAX_LEN), 400)
    assert "context length is 256" in e["message"] and e["param"] == "prompt"
    e = error_of(complete(max_tokens=MAX_LEN), 400)
    assert "lower max_tokens" in e["message"] and e["param"] == "max_tokens"
    e = error_of(complete(max_tokens=-1), 400)
    assert e["param"] == "max_tokens" and "greater than or equal to 0" in e["message"]
    e = error_of(complete(max_tokens=0), 400)
    assert e["param"] == "max_tokens" and "only meaningful with echo" in e["message"]
    e = error_of(complete(temperature="hot"), 400)
    assert e["param"] == "temperature" and e["type"] == "invalid_request_error"
    e = error_of(complete(top_p=0), 400)
    assert e["param"] == "top_p" and "greater than 0" in e["message"]
    e = error_of(complete(prompt=[5, 10**6]), 400)
    assert "token ids must be in [0, 512)" in e["message"]
    assert error_of(complete(logprobs=21), 400)["param"] == "logprobs"
    assert error_of(chat(top_logprobs=2), 400)["param"] == "top_logprobs"  # without logprobs: true
    e = error_of(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400)
    assert "only text content" in e["message"]
    e = error_of(complete(model="gpt-4"), 404)
    assert e["code"] == "model_not_found" and "'gpt-4' does not exist" in e["message"]
    r = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def test_a_failed_step_fails_its_requests_not_the_server(server, client, monkeypatch):
    engine = server[1].worker.engine

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "decode", broken)
    e = error_of(lambda: client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4), 500)
    assert e["type"] == "server_error" and "decode step failed" in e["message"]
    assert "device lost" not in e["message"]  # exception texts go to the log, not to clients
    with httpx.stream("POST", server[0] + "/v1/completions",
                      json={"prompt": "Hi", "max_tokens": 4, "stream": True}) as r:
        last = [line for line in r.iter_lines() if line][-1]
    assert "decode step failed" in json.loads(last.removeprefix("data: "))["error"]["message"]
    assert "device lost" not in last
    monkeypatch.undo()
    assert client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4).usage.completion_tokens > 0
    # a sequence ended by a stop token frees its slot one step after its answer
    wait_until(lambda: engine.free_slots == engine.num_slots, 10)


def test_model_without_chat_template(model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    model = lowbit.load(plain, device="cpu", dtype="float32", progress=False)
    with serving(create_app(model, max_batch=1, max_len=32)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        e = error_of(lambda: client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "Hi"}]),
                     400)
        assert "no chat template" in e["message"] and "--chat-template" in e["message"]
        assert str(tmp_path) not in e["message"]  # no server paths in answers
        assert client.completions.create(model="plain", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_synthetic_model_serves_token_ids_and_refuses_text(ref):
    model = synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, seed=3)
    prompt = [5, 17, 300, 42]
    want = model.generate([prompt], max_new_tokens=6, ignore_eos=True)[0].output_ids
    with serving(create_app(model, "tiny", max_batch=2, max_len=64)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        assert ids_of(r.choices[0]) == want and r.choices[0].text == ""
        e = error_of(lambda: client.completions.create(model="tiny", prompt="text", max_tokens=2), 400)
        assert "no tokenizer" in e["message"]
        e = error_of(lambda: client.completions.create(model="tiny", prompt=prompt, max_tokens=2, stop="x"), 400)
        assert e["param"] == "stop"


# ---------------------------------------------------------------- the command
def test_cli_refuses_bad_arguments_in_one_line(capsys, tmp_path, monkeypatch):
    assert cli_main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lowbit serve: error: no such checkpoint directory: {tmp_path / 'missing'}"
    assert cli_main(["serve"]) == 2
    assert "give a checkpoint PATH or --synthetic NAME" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli_main(["serve", "--synthetic", "tiny", "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert cli_main(["serve", "--synthetic", "tiny", "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "cannot read the chat template" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert cli_main(["serve", "--synthetic", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lowbit[serve]'" in err


def test_cli_serves_until_interrupted(model_dir, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(model_dir), "--port", "0", "--device",
                             "cpu", "--served-model-name", "tea", "--max-model-len", "64", "--max-num-seqs", "2",
                             "--chat-template", str(template), "--api-key", "sesame"],
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        assert banner.startswith("lowbit serve: 'tea' on http://127.0.0.1:"), banner
        assert "(2 slots of 64 positions)" in banner
        url = banner.split()[4]
        client = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        deadline = time.time() + 30
        while True:  # the banner comes just before uvicorn starts accepting
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline
                time.sleep(0.05)
        assert [(m.id, m.model_extra["max_model_len"]) for m in models] == [("tea", 64)]
        r = client.completions.create(model="tea", prompt="Hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        r = client.chat.completions.create(model="tea", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           extra_body={"return_token_ids": True})
        assert r.model_extra["prompt_token_ids"] == lowbit.load(model_dir, device="cpu", progress=False).encode("Hi")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, then lowbit exits 130
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Application shutdown complete" in err


def test_long_lived_objects_are_kept_out_of_the_garbage_collector(model_dir):
    """While serving, what was alive at startup is frozen (no full GC pass walks it: those stall the
    worker's decode loop for ~0.2 s); shutting down unfreezes it."""
    import gc

    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    assert gc.get_freeze_count() == 0
    with serving(create_app(model, max_batch=2, max_len=MAX_LEN)) as url:
        assert gc.get_freeze_count() > 10000
        assert httpx.get(url + "/health").status_code == 200
    assert gc.get_freeze_count() == 0


def test_queued_stream_events_go_out_in_one_write(model_dir):
    """A stream that fell behind writes every event already queued at once (one send, not one per
    token); the events themselves are unchanged."""
    import asyncio

    from lowbit.generate import StreamEvent
    from lowbit.serve.protocol import CompletionRequest
    from lowbit.serve.respond import Shape

    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    service = create_app(model, max_batch=2, max_len=MAX_LEN).state.service
    body = CompletionRequest(model="tiny-chat", prompt=[5, 6], stream=True, max_tokens=3)
    shape = Shape(service, False, body, [[5, 6]], None, None)

    async def run():
        sink = asyncio.Queue()
        for tok, text, fin in ((7, "a", None), (8, "b", None), (9, "c", "length")):
            sink.put_nowait((0, StreamEvent(0, tok, text, fin)))
        return [w async for w in service._stream([None], sink, shape, time.monotonic())]

    writes = asyncio.run(run())
    events = [w for w in writes if w.count("data: ") == 3]
    assert len(events) == 1, writes
    texts = [json.loads(e)["choices"][0]["text"] for e in events[0].split("data: ")[1:]]
    assert texts == ["a", "b", "c"] and writes[-1] == "data: [DONE]\n\n"


def test_connections_of_the_listening_socket_send_without_nagle():
    """The CLI's socket says TCP, so asyncio turns Nagle's algorithm off on every connection: with it
    on, a response body written after its headers waits for the client's delayed ACK (~40 ms added
    to every non-streamed answer, measured: /health 44 ms against 2.5 ms)."""
    import asyncio
    import socket as so

    from lowbit.commands.serve import _listen

    async def run():
        sock = _listen("127.0.0.1", 0)
        seen = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(so.IPPROTO_TCP, so.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        w.close()
        server.close()
        return seen

    assert asyncio.run(run()) == [1]
