"""`lowbit serve`'s API beyond plain generation, each answer checked against a computation on an
independently loaded copy of the model (`ref`): logprobs and top_logprobs against
log_softmax(Model.logits), echo with prompt logprobs, n > 1 and prompt lists against single
requests, stop_token_ids, min_tokens, penalties and min_p against a step-by-step reference,
include_stop_str_in_output, stream_options, /v1/models/{id}, /version, /tokenize, /detokenize,
/metrics, --api-key and --chat-template.
"""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

import lowbit
from lowbit.serve import create_app
from serve_helpers import MAX_LEN, client, error_of, model_dir, one_thread, ref, server, serving  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The kettle had been"


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def logprobs_ref(ref, ids: list[int]) -> torch.Tensor:
    """log_softmax of Model.logits: row t is the distribution of token t+1."""
    return torch.log_softmax(ref.logits(torch.tensor(ids)[None])[0], dim=-1)


def greedy_ref(ref, prompt_ids, n, adjust=lambda logits, out: logits):
    """Greedy decoding by full forwards, with `adjust(logits, out)` applied before the argmax."""
    out = []
    for _ in range(n):
        logits = ref.logits(torch.tensor(prompt_ids + out)[None])[0, -1]
        out.append(int(adjust(logits, out).argmax()))
    return out


def test_completion_logprobs_equal_log_softmax_of_the_logits(client, ref):
    r = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    prompt, out = r.model_extra["prompt_token_ids"], ids_of(c)
    lp = logprobs_ref(ref, prompt + out)
    for i, t in enumerate(out):
        row = lp[len(prompt) - 1 + i]
        assert c.logprobs.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
        top = row.topk(3)
        want = {ref.tokenizer.decode([int(j)], skip_special_tokens=False): float(v) for v, j in zip(*top)}
        got = c.logprobs.top_logprobs[i]
        assert set(want) <= set(got) and all(got[k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
        assert t == int(row.argmax())  # greedy: the top token
    # the text skips special tokens (a random tiny model may emit <s>); their logprob entries stay
    special = set(ref.tokenizer.all_special_ids)
    kept = "".join(s for s, t in zip(c.logprobs.tokens, out) if t not in special)
    assert kept == c.text or c.finish_reason == "stop"
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_echo_with_prompt_logprobs(client, ref):
    """What evaluation harnesses send (lm-eval local-completions): echo, logprobs, 0 or 1 new tokens."""
    prompt = ref.encode(PROMPT)
    lp = logprobs_ref(ref, prompt)
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny-chat", prompt=[prompt], max_tokens=max_tokens, temperature=0,
                                      logprobs=1, echo=True)
        c = r.choices[0]
        assert c.text.startswith(ref.decode(prompt))
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        assert len(c.logprobs.token_logprobs) == len(prompt) + max_tokens
        for t in range(1, len(prompt)):
            assert c.logprobs.token_logprobs[t] == pytest.approx(float(lp[t - 1, prompt[t]]), abs=1e-4)
        assert r.usage.completion_tokens == max_tokens
    # echo without logprobs, streamed
    chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=3, temperature=0,
                                            echo=True, stream=True))
    whole = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=3, temperature=0)
    assert "".join(ch.choices[0].text for ch in chunks) == PROMPT + whole.choices[0].text


def _count_fed_tokens(net, monkeypatch) -> list[int]:
    """Every forward of `net` appends how many tokens it was fed."""
    fed, forward = [], net.forward
    monkeypatch.setattr(net, "forward", lambda x, *a, **k: (fed.append(x.numel()), forward(x, *a, **k))[1])
    return fed


def test_echo_logprobs_come_from_the_prefill_and_bypass_a_cached_prefix(server, client, ref, monkeypatch):
    """Prompt logprobs are made by the prefill forward itself (no second forward over the prompt: the
    model is fed exactly the prompt, plus one token per decode step), and a prompt whose prefix is in
    the prefix cache still gets the logprobs of every token: an echo request computes its whole
    prompt (the cache is bypassed for it, not hit), and registers its blocks for later requests."""
    service = server[1]
    engine = service.worker.engine
    fed = _count_fed_tokens(service.worker.model.net, monkeypatch)
    prompt = (ref.encode(PROMPT) * 20)[:61]  # 3 full blocks of 16 and more
    client.completions.create(model="tiny-chat", prompt=[prompt[:50]], max_tokens=1, temperature=0)  # cached now
    assert fed == [50]
    lp = logprobs_ref(ref, prompt)
    for max_tokens in (0, 1, 3):
        fed.clear()
        hits = engine.prefix_cache_stats()["hit_blocks"]
        r = client.completions.create(model="tiny-chat", prompt=[prompt], max_tokens=max_tokens, temperature=0,
                                      logprobs=2, echo=True, extra_body={"ignore_eos": True})
        assert sum(fed) == len(prompt) + max(0, max_tokens - 1), fed  # one prefill, then decode steps
        assert engine.prefix_cache_stats()["hit_blocks"] == hits  # bypassed
        got = r.choices[0].logprobs.token_logprobs
        assert got[0] is None and len(got) == len(prompt) + max_tokens
        assert got[1:len(prompt)] == pytest.approx([float(lp[t - 1, prompt[t]]) for t in range(1, len(prompt))],
                                                   abs=1e-4)
        assert all(1 <= len(top) <= 3 for top in r.choices[0].logprobs.top_logprobs[1:])  # by string: may merge
    fed.clear()  # the echo requests' blocks serve a plain request with the same prompt
    client.completions.create(model="tiny-chat", prompt=[prompt], max_tokens=1, temperature=0)
    assert sum(fed) < len(prompt) and engine.prefix_cache_stats()["hit_blocks"] > hits


def test_prompt_logprobs_over_prefill_chunks_row_blocks_and_a_preemption(ref, monkeypatch):
    """The Scheduler alone: a prompt prefilled in chunks of 8 under a budget of 12 tokens, its logits
    made 3 rows at a time, and a preemption in the middle of its prefill (the logprobs are made again
    from the recomputed prefill): the logprobs equal log_softmax(Model.logits), reported once."""
    from lowbit import generate
    from lowbit.engine import Engine
    from lowbit.generate import Scheduler, Sequence
    from lowbit.sampling import SamplingParams

    monkeypatch.setattr(generate, "PROMPT_LOGITS_ROWS", 3)
    prompt = (ref.encode(PROMPT) * 10)[:29]
    lp = logprobs_ref(ref, prompt)
    want = [float(lp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    for preempt in (False, True):
        sched = Scheduler(Engine(ref, 2, 64), token_budget=12, chunk_size=8)
        seqs = [Sequence(i, prompt, SamplingParams(), n, set(), prompt_logprobs=1) for i, n in enumerate((0, 2))]
        for s in seqs:
            sched.add(s)
        events, steps = [], 0
        while sched.busy:
            events += sched.step()
            steps += 1
            if preempt and steps == 2:
                assert seqs[1].done < len(prompt)  # in the middle of its prefill
                sched._preempt(seqs[1])
        assert sched.preemptions == int(preempt)
        for s in seqs:
            mine = [e for e in events if e.index == s.index]
            assert len(mine) == max(1, s.max_new_tokens) and mine[-1].finish_reason == "length"
            entries = mine[0].prompt_logprobs
            assert entries[0] is None and [e.token_id for e in entries[1:]] == prompt[1:]
            assert [e.logprob for e in entries[1:]] == pytest.approx(want, abs=1e-4)
            assert all(len(e.top) == 1 for e in entries[1:]) and all(e.prompt_logprobs is None for e in mine[1:])


def test_chat_logprobs(client, ref):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    lp = logprobs_ref(ref, r.model_extra["prompt_token_ids"] + ids_of(c))
    n = len(r.model_extra["prompt_token_ids"])
    assert len(c.logprobs.content) == 4
    for i, (item, t) in enumerate(zip(c.logprobs.content, ids_of(c))):
        assert item.logprob == pytest.approx(float(lp[n - 1 + i, t]), abs=1e-4)
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.bytes == list(item.token.encode())
    streamed = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4,
                                                   temperature=0, logprobs=True, stream=True,
                                                   extra_body={"ignore_eos": True}))
    got = [x.logprob for ch in streamed if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert got == pytest.approx([x.logprob for x in c.logprobs.content], abs=1e-6)


def test_n_and_prompt_lists_equal_single_requests(client):
    kw = dict(model="tiny-chat", max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(prompt=PROMPT, n=3, temperature=0.9, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):  # choice j draws with seed + j
        alone = client.completions.create(prompt=PROMPT, temperature=0.9, seed=11 + j, **kw)
        assert ids_of(c) == ids_of(alone.choices[0])
    assert len({tuple(ids_of(c)) for c in r.choices}) > 1
    for prompts in (["Once upon a time", "B", "A"], [[5, 6, 7, 8], [9], [10, 11]]):
        r = client.completions.create(prompt=prompts, n=2, temperature=0, **kw)
        assert len(r.choices) == 6 and r.usage.completion_tokens == 6 * 8
        for i, c in enumerate(r.choices):
            alone = client.completions.create(prompt=prompts[i // 2], temperature=0, **kw)
            assert ids_of(c) == ids_of(alone.choices[0]) and c.text == alone.choices[0].text
            assert c.model_extra["prompt_token_ids"] == alone.model_extra["prompt_token_ids"]
    e = error_of(lambda: client.completions.create(prompt=["A", [5]], **kw), 400)  # no mixing, as OpenAI
    assert e["param"] == "prompt" and "none of the accepted types" in e["message"]
    chunks = list(client.completions.create(prompt=prompts, n=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    for i, c in enumerate(r.choices):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) == c.text
    assert chunks[-1].usage.completion_tokens == 48 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    c = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=4, temperature=0)
    assert len(c.choices) == 2 and c.choices[0].message.content == c.choices[1].message.content


def test_stop_token_ids_min_tokens_and_include_stop(client, ref):
    kw = dict(model="tiny-chat", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True,
                                                                           "return_token_ids": True})
    full = client.completions.create(max_tokens=12, **kw)
    out = ids_of(full.choices[0])
    stop_at = next(i for i in range(2, len(out)) if out[i] not in out[:i])
    r = client.completions.create(max_tokens=12, **kw | {"extra_body": kw["extra_body"] | {
        "stop_token_ids": [out[stop_at]]}})
    c = r.choices[0]
    assert ids_of(c) == out[:stop_at + 1] and c.finish_reason == "stop"
    assert c.text == ref.decode(out[:stop_at])  # the stop token's text is left out
    r = client.completions.create(max_tokens=12, **kw | {"extra_body": kw["extra_body"] | {
        "stop_token_ids": [out[stop_at]], "include_stop_str_in_output": True}})
    assert r.choices[0].text == ref.decode(out[:stop_at + 1])
    # min_tokens keeps the stop token from being sampled before it
    r = client.completions.create(max_tokens=12, **kw | {"extra_body": kw["extra_body"] | {
        "stop_token_ids": [out[0]], "min_tokens": 3}})
    got = ids_of(r.choices[0])
    assert len(got) >= 3 and out[0] not in got[:3]
    eos = ref.eos_token_ids[0]
    # ignore_eos: EOS is no stop token here, so min_tokens holds back only the stop ids (vLLM's rule)
    want = greedy_ref(ref, ref.encode(PROMPT), 3, lambda x, o: x.index_fill(0, torch.tensor([out[0]]),
                                                                           float("-inf")) if len(o) < 3 else x)
    assert got[:3] == want
    # a stop string, included
    text = full.choices[0].text
    stop = text[3:6]
    r = client.completions.create(max_tokens=12, stop=stop, **kw | {"extra_body": {"include_stop_str_in_output": True,
                                                                                 "ignore_eos": True}})
    assert r.choices[0].text == text[:text.find(stop) + len(stop)]


PENALTY_PROMPTS = [PROMPT, "a b a b a b a", "the the the the", "Once upon a time, once upon a time"]


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 3.0}, {"frequency_penalty": 2.0},
                                     {"presence_penalty": 2.0, "frequency_penalty": -0.5}])
def test_penalties_equal_a_step_by_step_reference(client, ref, penalty):
    def adjust_for(prompt):
        def adjust(x, out):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float()
            if "repetition_penalty" in penalty:
                p = penalty["repetition_penalty"]
                seen = counts > 0
                seen[prompt] = True
                x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
            return x - penalty.get("frequency_penalty", 0) * counts - penalty.get("presence_penalty", 0) * (counts > 0)
        return adjust

    # the first prompt whose greedy continuation the penalty changes (which one depends on the random
    # tiny model: with no repeated token in 24, a frequency penalty changes nothing)
    for text in PENALTY_PROMPTS:
        prompt = ref.encode(text)
        want = greedy_ref(ref, prompt, 24, adjust_for(prompt))
        if want != greedy_ref(ref, prompt, 24):
            break
    else:
        pytest.fail(f"{penalty} changes the greedy output of none of {PENALTY_PROMPTS}: nothing to compare")
    r = client.completions.create(model="tiny-chat", prompt=text, max_tokens=24, temperature=0,
                                  extra_body=penalty | {"ignore_eos": True, "return_token_ids": True})
    assert ids_of(r.choices[0]) == want


def test_min_p_one_keeps_only_the_top_token(client):
    kw = dict(model="tiny-chat", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})
    greedy = ids_of(client.completions.create(temperature=0, **kw).choices[0])
    hot = ids_of(client.completions.create(temperature=1.5, seed=3, **kw | {"extra_body": kw["extra_body"] | {
        "min_p": 1.0}}).choices[0])
    assert hot == greedy


def test_max_completion_tokens_and_skip_special_tokens(client, ref):
    r = client.completions.create(model="tiny-chat", prompt=PROMPT, temperature=0,
                                  extra_body={"max_completion_tokens": 5, "ignore_eos": True,
                                              "return_token_ids": True, "skip_special_tokens": False})
    ids = ids_of(r.choices[0])
    assert len(ids) == 5 and r.choices[0].text == ref.tokenizer.decode(ids, skip_special_tokens=False)


def test_models_version_tokenize_detokenize_metrics(server, client, ref):
    url = server[0]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert error_of(lambda: client.models.retrieve("gpt-4"), 404)["code"] == "model_not_found"
    assert httpx.get(url + "/version").json() == {"version": lowbit.__version__}
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == ref.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_LEN
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert r["tokens"] == ref.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == ref.encode_chat(messages)
    assert httpx.post(url + "/detokenize", json={"tokens": ref.encode(PROMPT)}).json()["prompt"] == PROMPT
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    before = httpx.get(url + "/metrics").text
    client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(url + "/metrics").text

    def value(body, name):
        line = next((x for x in body.splitlines() if x.startswith(name + " ")), f"{name} 0")
        return float(line.split()[-1])

    assert value(text, "lowbit_generation_tokens_total") - value(before, "lowbit_generation_tokens_total") == 4
    assert value(text, "lowbit_time_to_first_token_seconds_count") > value(before, "lowbit_time_to_first_token_seconds_count")
    assert value(text, "lowbit_inter_token_latency_seconds_count") >= 3
    # the same prompt of several full KV blocks twice: the second finds the first's blocks cached
    long = " ".join([PROMPT] * 8)
    for _ in range(2):
        client.completions.create(model="tiny-chat", prompt=long, max_tokens=2, temperature=0)
    text = httpx.get(url + "/metrics").text
    assert value(text, 'lowbit_prefix_cache{counter="hit_blocks"}') > 0
    assert 0 <= value(text, "lowbit_kv_cache_usage_ratio") <= 1
    for name in ("lowbit_num_requests_waiting", "lowbit_num_requests_running", "lowbit_kv_cache_usage_ratio",
                 'lowbit_requests_total{route="/v1/completions",status="200"}'):
        assert name in text


def test_api_key_and_chat_template(model_dir, ref):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ greeting }}"
    model = lowbit.load(model_dir, device="cpu", dtype="float32", progress=False)
    app = create_app(model, max_batch=2, max_len=64, api_key="sesame", chat_template=template)
    with serving(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        assert error_of(lambda: bad.models.list(), 401)["code"] == "invalid_api_key"
        assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health, metrics, version stay open
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        r = good.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=2,
                                         extra_body={"return_token_ids": True, "add_generation_prompt": False,
                                                     "chat_template_kwargs": {"greeting": "Hello"}})
        want = ref.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, greeting="Hello",
                                                 add_generation_prompt=False)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert r.model_extra["prompt_token_ids"] == list(want)
        e = error_of(lambda: good.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=2,
                                                          extra_body={"chat_template_kwargs": {"tokenize": False}}),
                     400)
        assert e["param"] == "messages"
