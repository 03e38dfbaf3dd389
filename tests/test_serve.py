"""``m2r2 serve``: the real server in a subprocess on a free port, driven by the official ``openai`` client and raw
``httpx``. Outputs equal ``lm.generate`` on each request alone; bad input gets a 4xx in OpenAI's error shape and
the server keeps serving; no slot leaks."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ServerProcess

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

PROMPTS = ["Name three colours.", "What is 2 + 2?", "Write one sentence about the sea.",
           "List two fruits.", "Say hello in French.", "What is the capital of Italy?",
           "Give me a word that rhymes with cat.", "Count from one to five."]


class Server(ServerProcess):
    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "4")
    yield s
    s.stop()


def _solo(lm, prompt: str, **kw) -> str:
    return lm.generate(prompt, **kw).text


def test_chat_and_completions_with_the_openai_client(server, embedded_lm):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct (embedded)"]
    r = c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24,
                                  temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content == _solo(embedded_lm, PROMPTS[0], max_new_tokens=24)
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(embedded_lm.encode(PROMPTS[0]))
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="m2r2", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24, temperature=0, stream=True)
        if ch.choices]
    assert "".join(pieces) == r.choices[0].message.content and len(pieces) > 2
    t = c.completions.create(model="m2r2", prompt="The sky is", max_tokens=12, temperature=0)
    assert t.choices[0].text == embedded_lm.decode_text(embedded_lm.generate("The sky is", chat=False,
                                                                              max_new_tokens=12).token_ids)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="m2r2", prompt="The sky is",
                                                                          max_tokens=12, temperature=0, stream=True))
    assert streamed == t.choices[0].text
    # usage at the end of a stream, when asked for
    last = list(c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, stream=True, stream_options={"include_usage": True}))[-1]
    assert last.usage.completion_tokens == 5 and last.choices == []


def test_stop_strings_and_max_completion_tokens(server, embedded_lm):
    c = server.client()
    full = _solo(embedded_lm, PROMPTS[7], max_new_tokens=40)
    stop = full.split()[2]
    r = c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": PROMPTS[7]}],
                                  max_completion_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[: full.index(stop)]


def test_concurrent_requests_equal_their_solo_runs(server, embedded_lm):
    """8 requests at once (different lengths, greedy and seeded sampling, plain and speculative): each gets what
    lm.generate gives for it alone."""
    c = server.client()
    cases = []
    for i, p in enumerate(PROMPTS):
        kw = {"max_tokens": 16 + 8 * i, "temperature": 0.0}
        if i % 3 == 1:
            kw.update(temperature=0.8, top_p=0.9, seed=100 + i)
        extra = {"m2r2": {"strategy": "prompt-lookup"}} if i % 4 == 2 else \
            {"m2r2": {"strategy": "eagle"}} if i % 4 == 3 else None  # (a drafter that reads the prompt's states)
        cases.append((p, kw, extra))

    def call(case):
        p, kw, extra = case
        r = c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": p}], extra_body=extra, **kw)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(call, cases))
    for (p, kw, extra), text in zip(cases, got):  # (a seeded sampled request: the same strategy alone)
        want = _solo(embedded_lm, p, max_new_tokens=kw["max_tokens"], temperature=kw["temperature"],
                     top_p=kw.get("top_p", 1.0), seed=kw.get("seed"),
                     strategy=extra["m2r2"]["strategy"] if extra else "plain")
        assert text == want, (p, kw)
    assert server.metric("m2r2_active_slots") == 0


def test_speculative_strategy_per_request_is_lossless(server, embedded_lm):
    c = server.client()
    r = c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=32,
                                  temperature=0, extra_body={"m2r2": {"strategy": "m2r2", "options": {"gamma": 3}}})
    assert r.choices[0].message.content == _solo(embedded_lm, PROMPTS[2], max_new_tokens=32)


def _post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json",
                                                                 **kw.pop("headers", {})}, timeout=60, **kw)


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"\xff\xfe", None),
    ([1, 2], None),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -3}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 7}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "m2r2": {"strategy": "nope"}}, "m2r2"),
    ({"messages": [{"role": "user", "content": "x"}], "m2r2": {"strategy": "calm"}}, "m2r2"),
    ({"messages": [{"role": "user", "content": "x"}], "m2r2": {"strategy": "m2r2", "options": {"gamma": 0}}}, "m2r2"),
    ({"messages": [{"role": "user", "content": "x"}], "m2r2": {"bogus": 1}}, "m2r2"),
])
def test_bad_requests_get_400_in_openai_shape(server, body, param):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_over_long_prompt_and_bad_completion_prompts(server):
    r = _post(server, "/v1/completions", {"prompt": list(range(5000)), "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    for prompt in ([], "", [1.5], {"a": 1}, [50000, 1]):
        r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400, prompt
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_a_disconnected_stream_frees_its_slot(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
                            "stream": True, "temperature": 0}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # the client goes away mid-stream
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("m2r2_active_slots") > 0:
        time.sleep(0.2)
    assert server.metric("m2r2_active_slots") == 0


def test_metrics_and_health(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("m2r2_requests_total", "m2r2_prompt_tokens_total", "m2r2_completion_tokens_total",
                 "m2r2_queue_length", "m2r2_active_slots", "m2r2_tokens_per_second",
                 "m2r2_time_to_first_token_seconds_bucket", "m2r2_time_per_output_token_seconds_bucket"):
        assert name in text, name
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 4


def test_bounded_load_every_request_completes(server, embedded_lm):
    """32 requests from 16 concurrent clients, time-limited: all complete, outputs equal their solo runs, and
    every slot is free afterwards."""
    c = server.client(timeout=120)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    want = {p: _solo(embedded_lm, p, max_new_tokens=12) for p in set(prompts)}

    def call(p):
        return c.chat.completions.create(model="m2r2", messages=[{"role": "user", "content": p}], max_tokens=12,
                                         temperature=0).choices[0].message.content

    t0 = time.time()
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(call, prompts))
    assert time.time() - t0 < 180
    assert got == [want[p] for p in prompts]
    assert server.metric("m2r2_active_slots") == 0 and server.metric("m2r2_queue_length") == 0


def test_api_key_and_queue_limit():
    s = Server("--parallel", "1", "--max-queue", "1", "--api-key", "sekret")
    try:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200}
        assert _post(s, "/v1/chat/completions", body).status_code == 401
        assert _post(s, "/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        auth = {"Authorization": "Bearer sekret"}
        results = []

        def call():
            results.append(_post(s, "/v1/chat/completions", body, headers=auth))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        ok = s.client(api_key="sekret").chat.completions.create(
            model="m2r2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert ok.choices[0].message.content is not None
    finally:
        s.stop()
