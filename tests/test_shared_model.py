"""Two requests on one loaded model: threads decoding at once with different strategies, weight formats and
kernel switches get exactly what each gets alone (no model-wide state on the request path)."""

import threading

import pytest
import torch

from m2r2.decoding.loop import decode
from m2r2.engine import native, weights
from m2r2.engine.sampling import SamplingConfig

PROMPTS = [[5, 9, 14, 3, 7, 22, 8], [40, 41, 42, 43, 12], [7, 7, 7, 90, 1, 2, 3, 4, 5]]


def _run_threads(jobs: dict) -> dict:
    """Run every job in its own thread, all started together (a barrier), and return their results."""
    out, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def work(name, fn):
        try:
            barrier.wait()
            out[name] = fn()
        except BaseException as e:  # reported below, not lost in the thread
            errors.append((name, e))

    threads = [threading.Thread(target=work, args=(n, f)) for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def _jobs(lm):
    m = lm.model

    def plain():
        return decode(m, PROMPTS, max_new_tokens=24)

    def plain_pytorch_path():  # native kernels off in this thread only
        with native.disabled():
            return decode(m, PROMPTS[:2], max_new_tokens=24)

    def int8_weights():  # another weight format for this thread's products only
        with m.use_weights("int8"):
            return decode(m, PROMPTS[1:], max_new_tokens=24)

    def speculative_fp16_drafts():  # drafts from fp16 copies, verification in float32
        return decode(m, PROMPTS, max_new_tokens=24, strategy=lm.strategy("early-exit", depth=1, draft_weights="fp16"))

    def sampled_prompt_lookup():
        return decode(m, PROMPTS[:1], max_new_tokens=24, sampling=SamplingConfig(temperature=0.8, seed=3),
                      strategy=lm.strategy("prompt-lookup"))

    jobs = {"plain": plain, "pytorch": plain_pytorch_path, "spec-fp16": speculative_fp16_drafts,
            "sampled": sampled_prompt_lookup}
    if weights.lowp_available():  # fp16 / int8 copies need FBGEMM (x86 builds)
        jobs["int8"] = int8_weights
    else:
        jobs.pop("spec-fp16")
    return jobs


def test_threads_decoding_on_one_model_get_what_they_get_alone(tiny_lm):
    jobs = _jobs(tiny_lm)
    m = tiny_lm.model
    with torch.inference_mode():  # build the reduced-precision copies first (load-boundary work)
        if weights.lowp_available():
            m.build_weights("int8")
            m.build_weights("fp16")
    alone = {}
    for name, fn in jobs.items():  # each alone, in a thread of its own (the same thread set-up as below)
        alone.update(_run_threads({name: fn}))
    for _ in range(2):
        together = _run_threads(jobs)
        for name in jobs:
            assert together[name][0] == alone[name][0], name
            assert together[name][1].forward_passes == alone[name][1].forward_passes, name
            assert together[name][1].layer_calls == alone[name][1].layer_calls, name
    # nothing leaked into the model or this thread
    assert m.weights == "fp32" and weights.active() is None and native.available() == native._ENABLED.get()


def test_weight_format_selection_is_per_thread(tiny_lm):
    if not weights.lowp_available():
        pytest.skip("no FBGEMM in this PyTorch build: only fp32 weights")
    m = tiny_lm.model
    m.build_weights("int8")
    inside, seen = threading.Event(), {}

    def other():
        inside.wait(10)
        seen["other"] = m.weights  # while the main thread is inside use_weights("int8")

    t = threading.Thread(target=other)
    t.start()
    with m.use_weights("int8"):
        seen["main"] = m.weights
        inside.set()
        t.join()
    assert seen == {"main": "int8", "other": "fp32"} and m.weights == "fp32"


@pytest.mark.slow
def test_m2r2_and_plain_share_the_embedded_model(embedded_lm):
    lm = embedded_lm
    p = [lm.encode(t) for t in ("Name three colours.", "What is 2 + 2?")]

    def spec():
        return [o.token_ids for o in lm.generate(prompts=p, max_new_tokens=32, strategy="m2r2")]

    def spec_fp16():
        return [o.token_ids for o in lm.generate(prompts=p, max_new_tokens=32,
                                                  strategy=lm.strategy("m2r2", draft_weights="fp16"))]

    def plain():
        return [o.token_ids for o in lm.generate(prompts=p, max_new_tokens=32)]

    jobs = {"spec": spec, "plain": plain}
    if weights.lowp_available():
        jobs["spec-fp16"] = spec_fp16
    alone = {}
    for name, fn in jobs.items():
        alone.update(_run_threads({name: fn}))
    together = _run_threads(jobs)
    assert together == alone
    assert alone["spec"] == alone["plain"]  # and lossless, as alone
