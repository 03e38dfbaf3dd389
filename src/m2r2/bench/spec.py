"""``m2r2 bench spec``: every speculative strategy against m2r2's plain decoding, on the same prompts, in one
run. The m2r2 arms use the same engine, cache and verifier (``m2r2.decoding.speculative``): only the drafter
differs. Every arm runs in its own worker process, on its own copy of the model. External arms:
transformers' prompt-lookup assisted generation and llama.cpp plain decoding.

Per arm and prompt category: tokens/s, speedup over m2r2-plain (per prompt, then geometric mean), tokens
per verification, acceptance rate, draft cost relative to a full forward (measured, and in weight bytes
read), and, under greedy decoding, whether every lossless arm produced the plain output token for token.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..options import int_at_least as _int_at_least
from ..decoding.drafters.base import forward_bytes
from ..decoding.speculative import Speculative
from ..errors import M2R2Error
from ..engine.threads import available_cpus
from ..provenance import pin_threads, roofline, run_end, run_start
from .args import add_common_args, build_prompts
from .arms import ArmResult, ArmSpec, ArmUnavailable, BenchPrompt, worker_lm
from .decode import HFGenerateArm, LlamaCppArm
from .report import write_results
from .runner import run_benchmark
from .stats import add_near_ties, summarize

# arm name -> (strategy, options); the draft vocabulary is the adapter's frequent-token subset
M2R2_ARMS: dict[str, tuple[str, dict]] = {
    "m2r2-plain": ("plain", {}),
    "m2r2": ("m2r2", {"rate": 2}),
    "m2r2-full-vocab": ("m2r2", {"rate": 2, "draft_vocab": False}),
    "m2r2-confstop": ("m2r2", {"rate": 2, "stop_below": 0.4}),  # stop drafting when the fast stream is unsure
    "m2r2-int8": ("m2r2", {"rate": 2, "draft_weights": "int8"}),  # the fast stream from int8 weight copies
    "m2r2-r3": ("m2r2", {"rate": 3}),
    "m2r2-r4": ("m2r2", {"rate": 4}),
    "early-exit": ("early-exit", {}),
    "early-exit-adapter": ("early-exit-adapter", {"rate": 2}),
    "quant-draft": ("quant-draft", {}),  # the whole model from its int8 weight copies
    "quant-draft-fp16": ("quant-draft", {"draft_weights": "fp16"}),
    "prompt-lookup": ("prompt-lookup", {}),
    "lookahead": ("lookahead", {}),  # W=4, N=4: 12 window rows in every verification forward
    "medusa": ("medusa", {}),  # 3 heads, chain drafting over the draft vocabulary
    # one decoder layer on the target's features (Q8_0), chain drafting over the draft vocabulary; its registry
    # default of one draft to start (adapting), not the benchmark's --gamma
    "eagle": ("eagle", {"gamma": 1}),
    "draft-model": ("draft-model", {}),  # 4 layers of the target, LoRA-distilled, its own KV cache
    # draft trees: the main chain plus the drafter's 2 next guesses at each depth as leaves, one verification
    "eagle-tree": ("eagle", {"gamma": 1, "branch": 3}),
    "m2r2-tree": ("m2r2", {"rate": 2, "branch": 3}),
    # confidence-driven trees (EAGLE-2-style): a leaf only where the drafter gives it at least 0.3 (EAGLE) or 0.2 (M2R2,
    # whose step is mostly drafting, so a verification row costs it relatively less)
    "eagle-dyntree": ("eagle", {"gamma": 1, "branch": 4, "leaf_min_prob": 0.3}),
    "m2r2-dyntree": ("m2r2", {"rate": 2, "branch": 4, "leaf_min_prob": 0.2}),
    # the fast stream that also reads the slow stream's previous final state (chains, and trees)
    "m2r2-eagle": ("m2r2-eagle", {"rate": 2}),
    "m2r2-eagle-tree": ("m2r2-eagle", {"rate": 2, "branch": 3}),
}
EXTERNAL_ARMS = ("hf-pld", "hf-assist", "llamacpp")
ARM_NAMES = (*M2R2_ARMS, *EXTERNAL_ARMS)
DEFAULT_ARMS = ("m2r2-plain", "m2r2", "m2r2-full-vocab", "m2r2-confstop", "m2r2-int8", "m2r2-r3", "m2r2-r4",
                "early-exit", "early-exit-adapter", "quant-draft", "prompt-lookup", "lookahead", "medusa",
                "eagle", "draft-model", "hf-pld", "hf-assist", "llamacpp")


class StrategyArm:
    """One m2r2 strategy through the public API (``lm.strategy`` + ``lm.generate``)."""

    kind = "m2r2"

    def __init__(self, lm, name: str, strategy: str, options: dict, gamma: int, temperature: float, seed: int):
        self.lm, self.name, self.strategy_name = lm, name, strategy
        self.options = dict(options)
        if strategy != "plain":
            self.options.setdefault("gamma", gamma)
            self.options.setdefault("max_gamma", max(8, gamma))
        self.temperature, self.seed = temperature, seed
        self.strategy = None

    def setup(self) -> None:
        try:
            self.strategy = self.lm.strategy(self.strategy_name, **self.options)
        except M2R2Error as e:  # e.g. no adapter ships for this rate
            raise ArmUnavailable(str(e)) from None

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        t0 = time.perf_counter()
        out = self.lm.generate(list(prompt.token_ids), max_new_tokens=max_new_tokens, temperature=self.temperature,
                               seed=self.seed, strategy=self.strategy)
        seconds = time.perf_counter() - t0
        s = out.stats
        # the drafter's read cost is computed here, where the drafter lives (the arm's worker process)
        cost = draft_bytes(self.lm, self.name, self.strategy) if self.strategy_name != "plain" else None
        return ArmResult(len(out.token_ids), seconds, out.token_ids, s.forward_passes,
                         {"engine_seconds": s.seconds, "prefill_seconds": s.prefill_seconds,
                          "decode_tokens_per_s": s.decode_tokens_per_s, "steps": s.steps,
                          "finish_reason": out.finish_reason, **({"strategy": s.extra} if s.extra else {}),
                          **({"draft_cost_bytes": cost} if cost is not None else {})})

    def close(self) -> None:
        pass


class HFAssistArm(HFGenerateArm):
    """transformers' assisted generation with ``assistant_model=`` the distilled draft model (the one the
    ``draft-model`` arm runs, converted to a transformers model: same weights, same tokenizer)."""

    def __init__(self, lm, name: str = "hf-assist"):
        super().__init__(lm, name)

    def setup(self) -> None:
        import functools

        from ..decoding.drafters.draft_model import to_hf
        from ..errors import AdapterError
        try:
            drafter = self.lm.strategy("draft-model").drafter
        except AdapterError as e:
            raise ArmUnavailable(str(e)) from None
        if self.lm.source.hf_dir is None:
            raise ArmUnavailable("the model has no transformers directory")
        super().setup()
        assistant = to_hf(drafter.model, self.lm.source.hf_dir)
        self.model.generate = functools.partial(self.model.generate, assistant_model=assistant)


class GreedyOnly:
    """Wraps an external arm that this benchmark can only run greedily."""

    def __init__(self, arm, temperature: float):
        self.arm, self.temperature = arm, temperature
        self.name, self.kind = arm.name, arm.kind

    def setup(self) -> None:
        if self.temperature > 0:
            raise ArmUnavailable("greedy only in this benchmark")
        self.arm.setup()

    def run(self, prompt, max_new_tokens):
        return self.arm.run(prompt, max_new_tokens)

    def close(self) -> None:
        self.arm.close()


def draft_bytes(lm, name: str, strategy) -> float | None:
    """Weight bytes one draft token reads, relative to a full forward (float32), as the drafter accounts them
    (``Drafter.draft_bytes``: the layers it runs, its adapters or Medusa head and its read-out rows, at the bytes
    per weight it reads them with). Prompt lookup and Lookahead read nothing to draft (Lookahead pays in its
    verification forward instead: see the verify cost). None for a strategy without a drafter."""
    if not isinstance(strategy, Speculative):
        return None
    return strategy.drafter.draft_bytes(lm.model) / forward_bytes(lm.model)


def speculative_summary(records: list[dict], categories: list[str]) -> dict:
    """Per arm (all prompts and per category): tokens per verification, acceptance, draft cost (measured
    from the records' timings; in bytes as the arm's worker reported it)."""
    plain = [r for r in records if r["arm"] == "m2r2-plain"]
    plain_tok_s = sorted(r["extra"].get("decode_tokens_per_s") or 0 for r in plain)
    plain_token_seconds = 1 / plain_tok_s[len(plain_tok_s) // 2] if plain_tok_s and plain_tok_s[len(plain_tok_s) // 2] else None

    def agg(rows: list[dict]) -> dict:
        st = [r["extra"].get("strategy", {}) for r in rows]
        steps = sum(s.get("verify_steps", 0) for s in st)
        drafted = sum(s.get("drafted", 0) for s in st)
        accepted = sum(s.get("accepted", 0) for s in st)
        calls = sum(s.get("draft_calls", 0) for s in st)
        dsec = sum(s.get("draft_seconds", 0.0) for s in st)
        vsec = sum(s.get("verify_seconds", 0.0) for s in st)
        out = {"verify_steps": steps, "tokens_per_verify": (accepted + steps) / steps if steps else None,
               "acceptance": accepted / drafted if drafted else None,
               "draft_seconds": dsec, "verify_seconds": vsec}
        depth = max((len(s.get("depth_reached", [])) for s in st), default=0)
        reached = [sum(s.get("depth_reached", [0] * depth)[d] for s in st if len(s.get("depth_reached", [])) > d)
                   for d in range(depth)]
        kept = [sum(s.get("depth_kept", [0] * depth)[d] for s in st if len(s.get("depth_kept", [])) > d)
                for d in range(depth)]
        while reached and not reached[-1]:
            reached.pop()
        # the chance that draft d (1-based) is kept, given that every draft before it was
        out["acceptance_by_depth"] = [kept[d] / reached[d] if reached[d] else None for d in range(len(reached))]
        out["depth_reached"] = reached
        by_rows: dict[str, list] = {}
        for s_ in st:
            for k, (n, sec) in s_.get("verify_by_rows", {}).items():
                e = by_rows.setdefault(k, [0, 0.0])
                e[0], e[1] = e[0] + n, e[1] + sec
        if plain_token_seconds:  # one verification of k rows per sequence, in plain decode steps
            out["verify_cost_by_rows"] = {k: sec / n / plain_token_seconds
                                          for k, (n, sec) in sorted(by_rows.items(), key=lambda kv: int(kv[0])) if n}
        out["verify_steps_by_rows"] = {k: n for k, (n, _) in sorted(by_rows.items(), key=lambda kv: int(kv[0]))}
        if calls and plain_token_seconds:
            out["draft_cost_measured"] = dsec / calls / plain_token_seconds
        if steps and plain_token_seconds:
            out["verify_cost_measured"] = vsec / steps / plain_token_seconds
            # the cost model: a verification step yields tokens_per_verify tokens for (drafting + verifying) time, in
            # plain decode steps; what the speedup would be with nothing else (prefill, Python between steps) counted
            out["step_cost"] = (dsec + vsec) / steps / plain_token_seconds
            out["cost_model_speedup"] = out["tokens_per_verify"] / out["step_cost"] if out["step_cost"] else None
        if steps:
            out["drafts_per_verify"] = calls / steps
            out["nodes_per_verify"] = sum(s.get("draft_nodes", 0) for s in st) / steps
        return out

    summary = {}
    for name in dict.fromkeys(r["arm"] for r in records):
        rows = [r for r in records if r["arm"] == name]
        if not any("strategy" in r["extra"] for r in rows):
            continue
        entry = {"all": agg(rows), "by_category": {c: agg([r for r in rows if r["category"] == c])
                                                   for c in categories if any(r["category"] == c for r in rows)},
                 "draft_cost_bytes": rows[-1]["extra"].get("draft_cost_bytes")}
        summary[name] = entry
    return summary


def make_arm(name: str, model: str | None, threads: int, n_ctx: int, strategy: str | None = None,
             options: dict | None = None, gamma: int = 4, temperature: float = 0.0, seed: int = 0,
             pld_tokens: int = 3):
    """Build arm ``name`` on its own copy of the model (``worker_lm``): runs inside the arm's worker process."""
    lm = worker_lm(model)
    if strategy is not None:
        return StrategyArm(lm, name, strategy, options or {}, gamma, temperature, seed)
    if name == "hf-pld":
        return GreedyOnly(HFGenerateArm(lm, "hf-pld", prompt_lookup_num_tokens=pld_tokens), temperature)
    if name == "hf-assist":
        return GreedyOnly(HFAssistArm(lm), temperature)
    if name == "hf-generate":
        return GreedyOnly(HFGenerateArm(lm), temperature)
    if name == "llamacpp":
        return GreedyOnly(LlamaCppArm(lm, threads, n_ctx), temperature)
    raise ValueError(f"unknown arm {name!r}")


def make_arms(names: list[str], args: argparse.Namespace, n_ctx: int) -> list[ArmSpec]:
    """Picklable descriptions of the arms (``make_arm`` builds each in its worker)."""
    arms = []
    for n in dict.fromkeys(names):
        common = {"name": n, "model": args.model, "threads": args.threads, "n_ctx": n_ctx,
                  "temperature": args.temperature}
        if n in M2R2_ARMS:
            strat, opts = M2R2_ARMS[n]
            if args.adapter and n in ("m2r2", "m2r2-full-vocab", "m2r2-confstop", "m2r2-tree"):
                opts = {**opts, "adapter": args.adapter}
            # m2r2's strategies share one worker and one loaded model (one engine; a model copy for each of
            # up to 15 arms would not fit in memory); external engines get a worker each
            arms.append(ArmSpec(n, "m2r2", make_arm, {**common, "strategy": strat, "options": opts,
                                                      "gamma": args.gamma, "seed": args.seed}, group="m2r2"))
        elif n in (*EXTERNAL_ARMS, "hf-generate"):
            arms.append(ArmSpec(n, "external", make_arm, {**common, "pld_tokens": args.pld_tokens}))
        else:
            raise M2R2Error(f"unknown arm {n!r} (available: {', '.join(ARM_NAMES)}, hf-generate)")
    return arms


def main(args: argparse.Namespace) -> int:
    import m2r2

    args.threads = pin_threads(args.threads or available_cpus())
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "m2r2-plain" not in names:
        names.insert(0, "m2r2-plain")  # the baseline every ratio and equality check refers to
    if args.temperature < 0:
        raise M2R2Error(f"--temperature must be >= 0, got {args.temperature}")
    start = run_start(args.bandwidth_mb)
    # this process only tokenizes, checks and scores: every arm loads its engine in its own worker
    lm = m2r2.load(args.model, dtype="float32")
    prompts, warm = build_prompts(lm, args)
    if args.per_category:  # a stratified subset: the first N prompts of every category
        seen: dict[str, int] = {}
        keep = []
        for p_ in prompts:
            if seen.get(p_.category, 0) < args.per_category:
                seen[p_.category] = seen.get(p_.category, 0) + 1
                keep.append(p_)
        prompts = keep
    longest = max(len(p.token_ids) for p in [*prompts, warm])
    n_ctx = min(lm.config.max_position_embeddings, -(-(longest + args.max_new_tokens + 32) // 256) * 256)
    arms = make_arms(names, args, n_ctx)
    bandwidth = start["bandwidth_gbps"]
    roof = roofline(lm.config, bandwidth, 4.0)
    arm_roofs = {}
    if lm.source.gguf is not None and "llamacpp" in names:
        arm_roofs["llamacpp"] = bandwidth * 1e9 / lm.source.gguf.stat().st_size
    print(f"m2r2 bench spec: {lm!r}; {len(prompts)} prompts, arms {', '.join(a.name for a in arms)}, "
          f"{args.threads} threads, temperature {args.temperature}, bandwidth {bandwidth:.1f} GB/s, "
          f"roofline {roof['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    skipped: dict[str, str] = {}
    records = run_benchmark(arms, prompts, args.max_new_tokens, warmup=args.warmup, repeats=args.repeats,
                            progress=not args.no_progress, warmup_prompt=warm, skipped=skipped)
    run_end(args.bandwidth_mb)
    greedy = args.temperature == 0
    summary = summarize(records, "m2r2-plain", reference_arm="m2r2-plain" if greedy else None,
                        roofline_tokens_per_s=roof["tokens_per_s"], arm_rooflines=arm_roofs)
    if greedy:
        add_near_ties(summary, records, prompts, lm)
    summary["speculative"] = speculative_summary(records, summary["categories"])
    meta = {"model": lm.source.name, "model_identity": lm.source.identity, "prompts": args.prompt_ids or args.prompts, "adapter": args.adapter,
            "n_prompts": len(prompts), "per_category": args.per_category, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed, "gamma": args.gamma, "repeats": args.repeats, "warmup": args.warmup,
            "arms": [a.name for a in arms if a.name not in skipped], "skipped_arms": skipped,
            "pld_tokens": args.pld_tokens, "loadavg_start": start["loadavg"], "isolation": "process-per-engine (m2r2 arms share one worker; each external engine its own)",
            "bandwidth_gbps": bandwidth, "roofline": roof,
            "lossless_check": "token equality with m2r2-plain" if greedy else
            "none per output (sampling); exactness is tested statistically in tests/test_speculative.py"}
    write_results(args.out, meta, records, summary, args.out_dir, keep_token_ids=args.keep_token_ids)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "spec", help="speculative decoding: M2R2 drafts vs every peer drafter, same verifier, one run",
        description="Every speculative strategy on the same prompts in one run, against m2r2's plain decoding; "
                    "writes benchmarks/results/<out>.json, .md and .png.")
    p.add_argument("--adapter", default=None, help="adapter directory for the m2r2 arms (default: the shipped ones)")
    p.add_argument("--per-category", type=_int_at_least("--per-category", 1), default=None,
                   help="use the first N prompts of each category (after --limit)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=_int_at_least("--gamma", 1), default=4, help="initial draft length (adapts)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated (default: {','.join(DEFAULT_ARMS)}; also hf-generate)")
    p.add_argument("--repeats", type=_int_at_least("--repeats", 1), default=1)
    p.add_argument("--pld-tokens", type=_int_at_least("--pld-tokens", 1), default=3)
    p.add_argument("--keep-token-ids", action="store_true")
    add_common_args(p, out="spec", prompts="mt-bench", max_new_tokens=128)
    p.set_defaults(func=main)
    return p
