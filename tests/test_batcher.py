"""The continuous batcher under ``m2r2 serve``, on a tiny random model: requests joining and leaving a running
batch get exactly what ``decode`` gives each alone; chunked prefill interleaves with running streams;
cancellation and finished requests free their slots; the queue is bounded."""

import threading
import time

import pytest

from m2r2.decoding.loop import decode
from m2r2.engine.sampling import SamplingConfig
from m2r2.errors import ContextLengthError, PromptError, StrategyError
from m2r2.serving.batcher import Batcher, QueueFull, Request

PROMPTS = [[5, 9, 14, 3, 7], [40, 41, 42, 43, 12, 9, 9, 9, 3, 1, 2], [7, 7, 7, 90], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
           [11, 12], [60, 61, 62, 63, 64, 65, 66], [8], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]]


def _collect(batcher, reqs):
    """Submit every request at once; wait for all; return each one's tokens and its events."""
    results = [dict(tokens=[], events=[], done=threading.Event()) for _ in reqs]

    def cb(i):
        def on_event(ev):
            results[i]["tokens"].extend(ev.token_ids)
            results[i]["events"].append(ev)
            if ev.finish_reason:
                results[i]["done"].set()
        return on_event
    handles = [batcher.submit(r, cb(i)) for i, r in enumerate(reqs)]
    for r in results:
        assert r["done"].wait(60)
    return results, handles


@pytest.fixture
def batcher(tiny_lm):
    b = Batcher(tiny_lm, parallel=3, max_queue=16, prefill_chunk=4).start()
    yield b
    b.stop()


def _solo(lm, req):
    out, _ = decode(lm.model, [req.prompt_ids], max_new_tokens=req.max_tokens, sampling=req.sampling,
                    strategy=lm.strategy(req.strategy, **req.strategy_options))
    return out[0]


def test_requests_joining_a_running_batch_equal_their_solo_runs(tiny_lm, batcher):
    """8 requests on 3 slots (so they join as others leave), different lengths, greedy and seeded sampling,
    plain and speculative: each equals decode on it alone."""
    reqs = []
    for i, p in enumerate(PROMPTS):
        s = SamplingConfig(temperature=0.9, top_p=0.9, seed=i) if i % 3 == 1 else SamplingConfig()
        strategy = "prompt-lookup" if i % 4 == 2 else ("early-exit" if i % 4 == 3 else "plain")
        opts = {"depth": 1} if strategy == "early-exit" else {}
        reqs.append(Request(p, max_tokens=6 + 3 * i, sampling=s, strategy=strategy, strategy_options=opts))
    results, _ = _collect(batcher, reqs)
    for req, r in zip(reqs, results):
        assert r["tokens"] == _solo(tiny_lm, req), req
        assert r["events"][-1].finish_reason in ("length", "stop")
        assert r["events"][-1].completion_tokens == len(r["tokens"])
        assert r["events"][-1].prompt_tokens == len(req.prompt_ids)
    assert batcher.active() == 0 and batcher.queued() == 0


def test_chunked_prefill_interleaves_with_running_streams(tiny_lm, tiny_dir):
    b = Batcher(tiny_lm, parallel=2, prefill_chunk=2).start()
    try:
        order = []
        lock = threading.Lock()
        done = [threading.Event(), threading.Event()]

        def cb(name, i):
            def on_event(ev):
                with lock:
                    order.append((name, len(ev.token_ids)))
                if ev.finish_reason:
                    done[i].set()
            return on_event
        running = Request(PROMPTS[0], max_tokens=40)
        b.submit(running, cb("running", 0))
        while not order:
            time.sleep(0.001)
        long = Request(PROMPTS[7], max_tokens=4)  # 12 tokens: 6 chunks of 2
        b.submit(long, cb("long", 1))
        assert done[0].wait(60) and done[1].wait(60)
        first_long = next(i for i, (n, _) in enumerate(order) if n == "long")
        before = [n for n, _ in order[:first_long]]
        # while the long prompt was prefilled (6 steps) the running stream kept producing a token per step
        assert before.count("running") >= 6
    finally:
        b.stop()
    # and the chunked prefill computed what an unchunked one does
    assert _solo(tiny_lm, long) == [t for t in _tokens_of(tiny_lm, long)]


def _tokens_of(lm, req):
    b = Batcher(lm, parallel=1, prefill_chunk=3).start()
    try:
        results, _ = _collect(b, [req])
        return results[0]["tokens"]
    finally:
        b.stop()


def test_cancel_frees_the_slot_and_bad_requests_are_refused(tiny_lm):
    b = Batcher(tiny_lm, parallel=1, max_queue=1, ctx_size=64).start()
    try:
        got = []
        h = b.submit(Request(PROMPTS[0], max_tokens=50), lambda ev: got.append(ev))
        while not got:
            time.sleep(0.001)
        queued = b.submit(Request(PROMPTS[1], max_tokens=2), lambda ev: None)
        with pytest.raises(QueueFull):
            b.submit(Request(PROMPTS[2], max_tokens=2), lambda ev: None)
        h.cancel()
        deadline = time.time() + 10
        while (b.active() or b.queued()) and time.time() < deadline:
            time.sleep(0.01)
        assert b.active() == 0 and b.queued() == 0 and got[-1].finish_reason == "cancelled"
        assert len(got) < 50 and queued.finished is not None
        with pytest.raises(ContextLengthError):
            b.submit(Request(list(range(64)), max_tokens=2), lambda ev: None)
        with pytest.raises(PromptError):
            b.submit(Request([], max_tokens=2), lambda ev: None)
        with pytest.raises(PromptError):
            b.submit(Request([10 ** 6], max_tokens=2), lambda ev: None)
        with pytest.raises(StrategyError, match="lossless"):
            b.submit(Request([5], max_tokens=2, strategy="calm"), lambda ev: None)
        with pytest.raises(StrategyError, match="gamma"):
            b.submit(Request([5], max_tokens=2, strategy="prompt-lookup", strategy_options={"gamma": 0}),
                     lambda ev: None)
    finally:
        b.stop()


def test_a_request_at_the_context_end_stops_where_decode_does(tiny_lm):
    b = Batcher(tiny_lm, parallel=2, ctx_size=24).start()
    try:
        reqs = [Request(PROMPTS[7], max_tokens=100), Request(PROMPTS[3], max_tokens=100, strategy="prompt-lookup")]
        results, _ = _collect(b, reqs)
        for req, r in zip(reqs, results):
            assert len(req.prompt_ids) + len(r["tokens"]) <= 24
            assert r["events"][-1].finish_reason in ("length", "stop")
    finally:
        b.stop()
