"""``m2r2 bench decode``: greedy decoding speed of m2r2's plain decoder against transformers' ``generate``
(plain and prompt-lookup) and llama.cpp, on the same prompts and token ids, each arm in its own worker process.

Every arm gets the chat-templated prompt as token ids (``lm.encode``), decodes greedily up to
``--max-new-tokens`` and reports new tokens over wall time (prefill + decode). m2r2-plain and hf-generate
run the same float32 weights, so their outputs are compared token for token; m2r2-torch is m2r2-plain
with the native decode kernels switched off (every op through PyTorch), to show what they buy.
m2r2-gguf decodes from the GGUF's own 4-bit blocks (dequantised in the kernels to the float32 model's weights:
exact up to summation order); m2r2-fp16 / m2r2-int8 decode from reduced-precision copies of the weights (lossy: the table counts how
many outputs still match); m2r2-quant-draft drafts from the int8 copy and verifies with the float32 model
(lossless).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time

import torch

from ..engine import native
from ..options import int_at_least as _int_at_least
from ..errors import M2R2Error
from ..engine.threads import available_cpus
from ..engine import weights as weight_formats
from ..provenance import pin_threads, roofline, run_end, run_start
from .args import add_common_args, build_prompts
from .arms import ArmResult, ArmSpec, ArmUnavailable, BenchPrompt, worker_lm
from .report import write_results
from .runner import run_benchmark
from .stats import add_near_ties, add_rouge_l, summarize

ARM_NAMES = ("m2r2-plain", "m2r2-torch", "m2r2-gguf", "m2r2-fp16", "m2r2-int8", "m2r2-quant-draft", "hf-generate", "hf-pld",
             "llamacpp")


# ---------------------------------------------------------------- arms

class M2R2PlainArm:
    """m2r2's own decoder through the public API: plain decoding from the float32 weights, or from their
    fp16 / int8 copies (``weights``; lossy), or another strategy (``quant-draft``: lossless); with
    ``use_native=False``, without the native decode kernels (m2r2.engine.native)."""

    kind = "m2r2"

    def __init__(self, lm, name: str = "m2r2-plain", strategy: str = "plain", weights: str = "fp32",
                 use_native: bool = True):
        self.lm, self.name, self.strategy, self.weights = lm, name, strategy, weights
        self.use_native = use_native

    def setup(self) -> None:
        if self.weights == "gguf":  # the file's own blocks (read from the GGUF, not derived)
            from ..engine.gguf_weights import attach_gguf_blocks
            if self.lm.source.gguf is None:
                raise ArmUnavailable("the model was not loaded from a GGUF")
            attach_gguf_blocks(self.lm.model, self.lm.source.gguf)
        self.lm.model.build_weights(self.weights)  # outside the clock
        if self.strategy != "plain":
            self.strategy = self.lm.strategy(self.strategy)

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        t0 = time.perf_counter()
        with self.lm.model.use_weights(self.weights), \
                (contextlib.nullcontext() if self.use_native else native.disabled()):
            out = self.lm.generate(list(prompt.token_ids), max_new_tokens=max_new_tokens, temperature=0.0,
                                   strategy=self.strategy)
        seconds = time.perf_counter() - t0
        s = out.stats
        return ArmResult(len(out.token_ids), seconds, out.token_ids, s.forward_passes,
                         {"engine_seconds": s.seconds, "prefill_seconds": s.prefill_seconds,
                          "decode_tokens_per_s": s.decode_tokens_per_s, "finish_reason": out.finish_reason,
                          **({"strategy": s.extra} if s.extra else {})})

    def close(self) -> None:
        pass


class HFGenerateArm:
    """transformers' ``generate`` on the same float32 weights (the converted HF directory), greedy;
    ``prompt_lookup_num_tokens`` turns on its prompt-lookup (n-gram) speculative decoding."""

    kind = "external"

    def __init__(self, lm, name: str = "hf-generate", prompt_lookup_num_tokens: int | None = None):
        self.lm, self.name, self.pld = lm, name, prompt_lookup_num_tokens
        self.model = None
        self.calls = 0

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # generation-config notices would interleave with the progress bar
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(self.lm.source.hf_dir), dtype=torch.float32)
        model.eval().requires_grad_(False)
        forward = model.forward

        # count target forward calls; functools.wraps keeps the signature, which generate() inspects
        # (e.g. for ``logits_to_keep``, without which prefill would compute logits at every position)
        @functools.wraps(forward)
        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        model.forward = counted
        gc = model.generation_config
        self.eos = gc.eos_token_id if gc.eos_token_id is not None else list(self.lm.config.eos_token_ids)
        eos_list = self.eos if isinstance(self.eos, list) else [self.eos]
        self.eos_set = set(eos_list)
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_list[0] if eos_list else 0)
        self.model = model

    @torch.inference_mode()
    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        ids = torch.tensor([prompt.token_ids], dtype=torch.long)
        kwargs = {"prompt_lookup_num_tokens": self.pld} if self.pld else {}
        self.calls = 0
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad, **kwargs)
        seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        # batch 1 never pads after EOS, but cut defensively at the first EOS
        for i, t in enumerate(new):
            if t in self.eos_set:
                new = new[: i + 1]
                break
        return ArmResult(len(new), seconds, new, self.calls,
                         {"finish_reason": "eos" if new and new[-1] in self.eos_set else "length"})

    def close(self) -> None:
        self.model = None


class LlamaCppArm:
    """llama.cpp (through xllamacpp's in-process server) on the model's own GGUF, greedy, plain decoding.

    The prompt goes in as the same token ids (the /completion endpoint takes ids), with prompt caching
    off so every call pays its prefill like the other arms. Primary time is end to end around the call;
    llama.cpp's own prompt/decode timings go to ``extra``. Token ids are only reported with
    ``token_ids=True`` (they come from per-token logprobs, which cost a little time)."""

    kind = "external"

    def __init__(self, lm, threads: int, n_ctx: int, name: str = "llamacpp", token_ids: bool = False):
        self.lm, self.threads, self.n_ctx, self.name, self.want_ids = lm, threads, n_ctx, name, token_ids
        self.server = None

    def setup(self) -> None:
        gguf = self.lm.source.gguf
        if gguf is None:
            raise ArmUnavailable("the model was not loaded from a GGUF")
        try:
            import xllamacpp
        except ImportError as e:
            raise ArmUnavailable(f"xllamacpp is not importable ({e}); pip install xllamacpp") from None
        p = xllamacpp.CommonParams()
        p.model.path = str(gguf)
        p.cpuparams.n_threads = self.threads
        p.cpuparams_batch.n_threads = self.threads
        p.n_ctx = self.n_ctx
        p.n_parallel = 1  # one slot: batch-1 decoding like every other arm
        p.cache_prompt = False
        p.verbosity = 0
        try:
            self.server = xllamacpp.Server(p)
        except (RuntimeError, ValueError, OSError) as e:
            raise ArmUnavailable(f"llama.cpp could not load {gguf.name}: {e}") from None

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        req = {"prompt": list(prompt.token_ids), "max_tokens": max_new_tokens, "temperature": 0.0,
               "cache_prompt": False, "stream": False}
        if self.want_ids:
            req["logprobs"] = 1
        t0 = time.perf_counter()
        r = self.server.handle_completions(req)
        seconds = time.perf_counter() - t0
        if not isinstance(r, dict) or "error" in r or "timings" not in r:
            raise RuntimeError(f"llama.cpp returned an error: {str(r)[:300]}")
        t = r["timings"]
        choice = r["choices"][0]
        ids = None
        if self.want_ids and choice.get("logprobs"):
            ids = [int(c["id"]) for c in choice["logprobs"]["content"]]
        # predicted_n counts every sampled token, EOS included (checked against m2r2's count)
        return ArmResult(int(t["predicted_n"]), seconds, ids, None, {
            "prompt_n": t.get("prompt_n"), "prompt_seconds": t["prompt_ms"] / 1000,
            "decode_seconds": t["predicted_ms"] / 1000, "decode_tokens_per_s": t.get("predicted_per_second"),
            "engine_seconds": (t["prompt_ms"] + t["predicted_ms"]) / 1000,
            "finish_reason": "eos" if choice.get("finish_reason") == "stop" else choice.get("finish_reason")})

    def close(self) -> None:
        self.server = None  # the server's destructor stops its loop


# ---------------------------------------------------------------- command

ARM_WEIGHTS = {"m2r2-gguf": "gguf", "m2r2-fp16": "fp16", "m2r2-int8": "int8"}  # arms not on the float32 weights


def make_arm(name: str, model: str | None, threads: int, n_ctx: int, pld_tokens: int,
             llamacpp_token_ids: bool):
    """Build arm ``name`` on its own copy of the model (``worker_lm``): runs inside the arm's worker process."""
    lm = worker_lm(model)
    if name in ("m2r2-plain", "m2r2-torch", "m2r2-gguf", "m2r2-fp16", "m2r2-int8", "m2r2-quant-draft"):
        return M2R2PlainArm(lm, name, strategy="quant-draft" if name == "m2r2-quant-draft" else "plain",
                            weights=ARM_WEIGHTS.get(name, "fp32"), use_native=name != "m2r2-torch")
    if name in ("hf-generate", "hf-pld"):
        return HFGenerateArm(lm, name, prompt_lookup_num_tokens=pld_tokens if name == "hf-pld" else None)
    if name == "llamacpp":
        return LlamaCppArm(lm, threads, n_ctx, token_ids=llamacpp_token_ids)
    raise ValueError(f"unknown arm {name!r}")


def make_arms(names: list[str], args: argparse.Namespace, n_ctx: int) -> list[ArmSpec]:
    """Picklable descriptions of the arms (``make_arm`` builds each in its worker)."""
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise M2R2Error(f"unknown arm(s) {', '.join(unknown)} (available: {', '.join(ARM_NAMES)})")
    return [ArmSpec(n, "m2r2" if n.startswith("m2r2") else "external", make_arm,
                    {"name": n, "model": args.model, "threads": args.threads, "n_ctx": n_ctx,
                     "pld_tokens": args.pld_tokens, "llamacpp_token_ids": args.llamacpp_token_ids})
            for n in dict.fromkeys(names)]


def main(args: argparse.Namespace) -> int:
    import m2r2

    args.threads = pin_threads(args.threads or available_cpus())
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not names:
        raise M2R2Error("--arms is empty")
    start = run_start(args.bandwidth_mb)
    # this process only tokenizes, checks and scores: every arm loads its engine in its own worker
    lm = m2r2.load(args.model, dtype="float32")
    prompts, warm = build_prompts(lm, args)
    longest = max(len(p.token_ids) for p in [*prompts, warm])
    n_ctx = min(lm.config.max_position_embeddings, -(-(longest + args.max_new_tokens + 16) // 256) * 256)
    arms = make_arms(names, args, n_ctx)

    bandwidth = start["bandwidth_gbps"]
    roof = roofline(lm.config, bandwidth, 4.0)  # the float32 arms read 4 bytes per weight
    arm_roofs: dict[str, float] = {
        a.name: roofline(lm.config, bandwidth, weight_formats.bytes_per_weight(ARM_WEIGHTS[a.name]))["tokens_per_s"]
        for a in arms if a.name in ARM_WEIGHTS}
    meta_extra: dict = {}
    if lm.source.gguf is not None and "m2r2-gguf" in names:
        # the GGUF block arm reads the file's tensors (the blocks and the norms) per token
        from ..engine.blocks import read_gguf_tensors
        size = sum(t.raw.nbytes for t in read_gguf_tensors(lm.source.gguf).values())
        arm_roofs["m2r2-gguf"] = bandwidth * 1e9 / size
        meta_extra["roofline_m2r2_gguf"] = {"bytes_per_token": size, "tokens_per_s": arm_roofs["m2r2-gguf"]}
    if lm.source.gguf is not None and "llamacpp" in names:
        # llama.cpp reads the quantised GGUF: about its file size per token (tied embedding = head)
        size = lm.source.gguf.stat().st_size
        arm_roofs["llamacpp"] = bandwidth * 1e9 / size
        meta_extra["roofline_gguf"] = {"gguf": lm.source.gguf.name, "bytes_per_token": size,
                                       "tokens_per_s": arm_roofs["llamacpp"]}
    print(f"m2r2 bench: {lm!r}; {len(prompts)} prompts, arms {', '.join(a.name for a in arms)}, "
          f"{args.threads} threads, bandwidth {bandwidth:.1f} GB/s, roofline {roof['tokens_per_s']:.1f} tok/s",
          file=sys.stderr)

    skipped: dict[str, str] = {}
    records = run_benchmark(arms, prompts, args.max_new_tokens, warmup=args.warmup, repeats=args.repeats,
                            progress=not args.no_progress, warmup_prompt=warm, skipped=skipped)
    run_end(args.bandwidth_mb)
    baseline = args.baseline
    summary = summarize(records, baseline, reference_arm="hf-generate",
                        also_against=[a for a in ("m2r2-plain",) if a != baseline],
                        roofline_tokens_per_s=roof["tokens_per_s"], arm_rooflines=arm_roofs)
    add_rouge_l(summary, records, lm)
    add_near_ties(summary, records, prompts, lm)
    meta = {"model": lm.source.name, "model_identity": lm.source.identity,
            "prompts": args.prompt_ids or args.prompts, "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "warmup": args.warmup,
            "arms": [a.name for a in arms if a.name not in skipped], "skipped_arms": skipped,
            "pld_tokens": args.pld_tokens, "loadavg_start": start["loadavg"], "isolation": "process-per-arm",
            "bandwidth_gbps": bandwidth, "roofline": roof, "native_kernels": native.available(), **meta_extra}
    write_results(args.out, meta, records, summary, args.out_dir, keep_token_ids=args.keep_token_ids)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "decode", help="greedy decoding speed: m2r2 vs transformers generate (plain, prompt lookup) vs llama.cpp",
        description="Greedy decoding speed of every arm on the same prompts (token ids), each arm in its own "
                    "worker process; "
                    "writes benchmarks/results/<out>.json, .md and .png.")
    p.add_argument("--arms", default=",".join(ARM_NAMES), help=f"comma-separated (default: {','.join(ARM_NAMES)})")
    p.add_argument("--baseline", default="hf-generate", help="arm the speed ratios are relative to "
                                                             "(ratios to m2r2-plain are reported too)")
    p.add_argument("--repeats", type=_int_at_least("--repeats", 1), default=1, help="runs per (prompt, arm); median")
    p.add_argument("--pld-tokens", type=_int_at_least("--pld-tokens", 1), default=3,
                   help="prompt_lookup_num_tokens of the hf-pld arm (default 3, the best on a 2-core CPU)")
    p.add_argument("--llamacpp-token-ids", action="store_true",
                   help="also collect llama.cpp's token ids (via logprobs; slightly slower) to compare outputs")
    p.add_argument("--keep-token-ids", action="store_true", help="store every arm's token ids in the JSON")
    add_common_args(p, out="decode", prompts="mt-bench", max_new_tokens=256)
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":  # the same parser and one-line errors as `m2r2 bench decode`
    from ..options import run_standalone

    if sys.argv[1:2] != ["decode"]:
        sys.argv.insert(1, "decode")
    run_standalone("python -m m2r2.bench.decode", "m2r2 bench decode",
                   lambda p: add_parser(p.add_subparsers(dest="bench_cmd", required=True)), lambda ns: ns.func(ns))
