"""Shared fixtures: tiny random Hugging Face checkpoints written to temp dirs (logic tests), and the
embedded model (a few integration tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import m2r2  # noqa: F401  first: m2r2 sets OpenMP's wait policy before torch loads libgomp
import torch

torch.set_num_threads(2)

F32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one float32 ulp at magnitude 1
# "really different" (a changed input or weights, not rounding): ulps_apart above 16x assert_close_rel's bound.
# Rounding weights to float16 (half an fp16 ulp = 4096 float32 ulps) moves a tiny model's logits ~2e4 ulps
FAR = 4096
_worst_ulps: dict[str, float] = {}  # per test: the largest error assert_close_rel saw, in F32_EPS * magnitude
_tie_allowances: list[str] = []  # each greedy divergence assert_same_tokens accepted as a float tie


def ulps_apart(actual, expected, *, scale=None) -> float:
    """max |actual - expected| in units of F32_EPS * magnitude, computed in float64. The magnitude is the
    largest |expected| unless ``scale`` is given (a number, or a tensor broadcast against the values, e.g. the
    per-element sum of |x_i w_i| of a dot product)."""
    a, e = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    assert bool(a.isfinite().all()) and bool(e.isfinite().all()), "non-finite values"
    err = (a - e).abs()
    if not bool((err > 0).any()):
        return 0.0
    return float(torch.where(err > 0, err / (F32_EPS * _magnitude(e, scale)), 0).max())  # inf: off at magnitude 0


def assert_close_rel(actual, expected, *, ulps: float = 256, scale=None) -> None:
    """|actual - expected| <= ulps * F32_EPS * magnitude everywhere (see ulps_apart for the magnitude): the
    float32 agreement of two orders of the same computation, on any CPU and SIMD width.

    Why a bound relative to the magnitude: a length-n float32 sum in any order (sequential, pairwise, 4-,
    8- or 16-lane SIMD, threads) is within (n-1) * eps * sum|terms| of the exact one (Higham, gamma_n), so
    two orders differ by at most ~2n eps * sum|terms|, and in practice by ~sqrt(n) eps * that (rounding
    errors are random-signed). A fixed absolute tolerance ignores the scale: 1e-5 is 4 ulps on a residual
    stream of magnitude 28, which an AVX-512 build exceeded. The default k = 256 ulps of the largest value
    covers whole tiny test models (hidden <= 128, intermediate <= 128, 2-8 layers: each layer adds a few
    sqrt(n)-sized reorderings that the later layers carry on) with a margin of ~8x over the largest error
    measured (33 ulps) with the native kernels built for -march=x86-64 (SSE2), x86-64-v3 (AVX2) and native
    (AVX-512); a real bug (a wrong index, a missing term) is off by a sizeable fraction of the magnitude,
    i.e. ~1e5-1e7 ulps (see FAR)."""
    got = ulps_apart(actual, expected, scale=scale)
    key = _current_test()
    _worst_ulps[key] = max(_worst_ulps.get(key, 0.0), got)
    assert got <= ulps, (f"max |actual - expected| is {got:.3g} float32 ulps of the magnitude, over the "
                         f"bound of {ulps} (magnitude {float(_magnitude(expected, scale).max()):.3g})")


def _magnitude(expected, scale) -> torch.Tensor:
    if scale is None:
        return torch.as_tensor(expected).detach().double().abs().max()
    return torch.as_tensor(scale, dtype=torch.float64)


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.<name>`` (a function a training loop calls once per step) raise KeyboardInterrupt on call
    ``calls + 1``: the run stops as Ctrl-C or a kill stops it, after ``calls`` steps and without the
    checkpoint that ``stop_after`` writes."""
    orig, n = getattr(module, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] > calls:
            raise KeyboardInterrupt
        return orig(*a, **k)
    monkeypatch.setattr(module, name, wrapped)


def make_tiny(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random checkpoint of ``arch`` to ``path`` and return the HF model."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=common.pop("tie_word_embeddings", False), **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=common.pop("tie_word_embeddings", True), **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    model.save_pretrained(path)
    return model


def random_moefication(lm, experts: int, top_k: int, seed: int = 0, random_bias: bool = False):
    """A MoEfication of ``lm``'s model with random neuron groups and random routers (``m2r2.moe.moefy``'s artifacts)."""
    from m2r2.moe.layers import MoESpec
    from m2r2.moe.moefy import MoEfyArtifacts
    c = lm.model.cfg
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(c.intermediate_size, generator=g).view(experts, -1) for _ in range(c.num_layers)])
    router_w = torch.randn(c.num_layers, experts, c.hidden_size, generator=g)
    router_b = torch.randn(c.num_layers, experts, generator=g) if random_bias else torch.zeros(c.num_layers, experts)
    return MoEfyArtifacts(MoESpec(experts, top_k, c.intermediate_size // experts, c.hidden_size, router_bias=True),
                          perm, router_w, router_b, lm.source.identity)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny(d, "llama")
    return d


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    import m2r2
    return m2r2.load(tiny_dir)


@pytest.fixture(scope="session")
def embedded_lm():
    import m2r2
    try:
        return m2r2.load()
    except m2r2.ModelNotFoundError as e:  # CI installs it; a bare checkout may not have it
        pytest.skip(str(e))


def count_native_blocks(monkeypatch) -> list:
    """Record the index of every block the native kernel runs from here on (one block per call, or the whole
    stack in one ``native.blocks`` call): a list to inspect after the run."""
    from m2r2.engine import native
    calls: list = []
    one, stack = native.block, native.blocks
    monkeypatch.setattr(native, "block", lambda blk, *a, **k: calls.append(blk.index) or one(blk, *a, **k))
    monkeypatch.setattr(native, "blocks", lambda model, *a, **k: calls.extend(b.index for b in model.layers)
                        or stack(model, *a, **k))
    return calls


@pytest.fixture(scope="session")
def embedded_fp32(embedded_lm):
    """The embedded model on float32 weights (``embedded_lm`` runs the GGUF's own blocks, the default)."""
    import m2r2
    return m2r2.load(weights="fp32")


def next_token_probs(model, ids: list[int], sampling) -> torch.Tensor:
    """The sampling distribution (V,) of the token after ``ids``, from a fresh full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), model.new_cache(1, len(ids)), torch.arange(len(ids)).unsqueeze(0))
    return sampling.probs(logits[0, -1])


def greedy_reference(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=hf_model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def assert_same_tokens(ours: list[int], ref: list[int], hf_model, prompt: list[int], model) -> None:
    """Token equality with a reference greedy decode (``hf_model``); a divergence is accepted only where the two
    tokens are a tie within the measured float32 noise of the two paths at that step.

    At the first differing step both paths' float32 logits (ours from ``model``, a m2r2 model; the reference's)
    are compared with the reference recomputed in float64 (the exact-arithmetic stand-in): e = the larger of the
    two paths' max |float32 - float64| over the vocabulary. A path can rank token b above a only where
    exact(a) - exact(b) <= 2 e, so the divergence is accepted if the float64 logits of the two tokens are that
    close, and each use is counted (reported at the end of the session)."""
    import copy
    n = min(len(ours), len(ref))
    for i in range(n):
        if ours[i] != ref[i]:
            ids = torch.tensor([prompt + ref[:i]])
            with torch.no_grad():
                hf32 = hf_model(ids).logits[0, -1].double()
                hf64 = copy.deepcopy(hf_model).double()(ids).logits[0, -1]
                mine = model(ids, model.new_cache(1, ids.shape[1]), torch.arange(ids.shape[1]).unsqueeze(0))
            noise = max(float((hf32 - hf64).abs().max()), float((mine[0, -1].double() - hf64).abs().max()))
            gap = abs(float(hf64[ours[i]] - hf64[ref[i]]))
            assert gap <= 2 * noise, (f"token {i} differs ({ours[i]} vs {ref[i]}): their float64 logits are "
                                      f"{gap:.3g} apart, beyond twice the paths' float32 noise ({noise:.3g})")
            _tie_allowances.append(f"{_current_test()}: token {i}, float64 gap {gap:.3g} <= 2 x noise {noise:.3g}")
            return
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"


def pytest_terminal_summary(terminalreporter) -> None:
    """How close the float comparisons came to their bounds, and how often a greedy divergence was allowed."""
    if _worst_ulps:
        test, worst = max(_worst_ulps.items(), key=lambda kv: kv[1])
        terminalreporter.write_line(f"assert_close_rel: {len(_worst_ulps)} tests, largest error {worst:.3g} float32 "
                                    f"ulps of the magnitude ({test})")
    terminalreporter.write_line(f"assert_same_tokens: float-tie allowance used {len(_tie_allowances)} times")
    for line in _tie_allowances:
        terminalreporter.write_line(f"  {line}")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``m2r2 serve`` in a subprocess on a free port (the embedded model), ready when /health answers."""

    def __init__(self, *args: str):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "m2r2.cli", "serve", "--port", str(self.port),
                                      "--threads", "2", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "M2R2_ADAPT_THREADS": "0"})
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
