"""The ``m2r2`` command line: a thin layer over the Python API. User mistakes (``M2R2Error``) print
one line and exit 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .options import ArgumentParser, argv as _argv, float_in, positive_int as _positive_int


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .engine.weights import names as weight_format_names
    p.add_argument("--model", default=None,
                   help="model directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype (float32: exact and fastest on CPU; bfloat16: for GPUs, slow on CPU)")
    p.add_argument("--weights", default=None, choices=list(weight_format_names()),
                   help="how the linear layers run: gguf (a GGUF's own blocks, exact; the default for a GGUF), fp32 "
                        "(exact; the default otherwise), fp16 or int8 copies (fewer bytes, output close to fp32's)")


def cmd_generate(args: argparse.Namespace) -> int:
    import m2r2
    from .engine import native
    from .engine.threads import available_cpus

    lm = m2r2.load(args.model, dtype=args.dtype, weights=args.weights, threads=args.threads or available_cpus())
    ids_so_far: list[int] = []
    printed = [""]

    def stream(row: int, new: list[int]) -> None:
        # re-decode the whole answer so multi-byte characters split across tokens print correctly
        ids_so_far.extend(new)
        text = lm.decode_text(ids_so_far) or ""
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    prompt: object = args.prompt
    if args.token_ids:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            from .errors import PromptError
            raise PromptError("--token-ids expects the prompt as space- or comma-separated integers") from None
    out = lm.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      strategy=lm.strategy(args.strategy, **strategy_options(args)),
                      chat=not args.no_chat, system=args.system, stream=None if args.json else stream)
    s = out.stats
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
                          "finish_reason": out.finish_reason, "stats": s.to_dict()}))
    else:
        sys.stdout.write("\n")
    print(f"m2r2: {s.new_tokens} tokens in {s.seconds:.2f} s = {s.tokens_per_s:.1f} tokens/s "
          f"(prefill {s.prefill_seconds * 1000:.0f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s, "
          f"{s.forward_passes} forward passes, strategy {s.strategy}, {lm.model.embed_tokens.weight.dtype}, "
          f"{lm.model.weights} weights, {'native kernels' if native.available() else 'PyTorch path'}, "
          f"{__import__('torch').get_num_threads()} threads)", file=sys.stderr)
    return 0


_OPT_PREFIX = "strategy_opt_"  # namespace keys of the flags generated from the strategies' options


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    """``--strategy NAME``, ``--opt KEY=VALUE`` and one flag per strategy option, generated from the registry
    (every option of every registered strategy reachable; a flag the chosen strategy does not take is an
    error naming the ones it does). Options whose names clash with another flag stay reachable by --opt."""
    from . import strategies  # noqa: F401  (registers the built-ins)
    from .decoding import registry
    names = registry.names()
    p.add_argument("--strategy", default="plain", choices=names, metavar="NAME",
                   help="decoding strategy (default plain; `m2r2 strategies` lists each with its options): "
                        + ", ".join(names))
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option by name (repeatable), e.g. --opt gamma=3")
    taken = {s for a in p._actions for s in a.option_strings}
    by_name: dict[str, list] = {}
    for n in names:
        for opt in registry.get(n).option_specs.values():
            by_name.setdefault(opt.name, []).append((n, opt))
    for key, uses in by_name.items():
        flag = "--" + key.replace("_", "-")
        if flag in taken or len({(o.kinds, o.nullable) for _, o in uses}) > 1:  # a clash, or one name, two types
            continue
        opt = uses[0][1]
        who = ", ".join(n for n, _ in uses)
        helptext = f"{opt.metadata.get('help', '')} (strategies: {who})"
        dest = _OPT_PREFIX + key
        if opt.kinds == {bool}:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=helptext)
            continue

        def parse(s: str, opt=opt, flag=flag):
            from .errors import StrategyError
            try:
                return registry.check_value(flag, opt, registry.parse_text(opt, s, flag))
            except StrategyError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        choices = opt.metadata.get("choices")
        p.add_argument(flag, dest=dest, type=parse, default=argparse.SUPPRESS, metavar=key.upper(),
                       help=helptext + (f"; one of {', '.join(map(str, choices))}" if choices else ""))


def strategy_options(args: argparse.Namespace) -> dict:
    """The strategy options given on the command line: generated flags, then --opt KEY=VALUE."""
    from .decoding import registry
    from .errors import StrategyError
    opts = {k[len(_OPT_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_OPT_PREFIX)}
    for item in args.opt:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise StrategyError(f"--opt takes KEY=VALUE, got {item!r}")
        opts[key.strip()] = registry.parse_value(args.strategy, key.strip(), value)
    return opts


def cmd_strategies(args: argparse.Namespace) -> int:
    from . import strategies  # noqa: F401
    from .decoding import registry
    for n in ([args.name] if args.name else registry.names()):
        print(registry.describe(n))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = ArgumentParser(prog="m2r2", description=(
        "Faster generation from a pretrained language model without changing what it says "
        "(Mixture of Multi-Rate Residuals)."))
    parser.add_argument("--version", action="version", version=f"m2r2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text, streaming it as it is produced",
                       description="Generate a response to PROMPT; text streams to stdout, speed to stderr.")
    g.add_argument("prompt", help="the prompt (the chat template is applied unless --no-chat)")
    g.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=128)
    g.add_argument("--temperature", type=float_in("--temperature"), default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float_in("--top-p", 0, 1, lo_open=True), default=1.0)
    g.add_argument("--top-k", type=_positive_int("--top-k"), default=0)
    g.add_argument("--seed", type=_positive_int("--seed"), default=None)
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--token-ids", action="store_true", help="PROMPT is a list of token ids")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_args(g)
    add_strategy_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("strategies", help="list the decoding strategies and their options",
                       description="Every registered decoding strategy, with its options, types and defaults.")
    s.add_argument("name", nargs="?", default=None, help="one strategy (default: all)")
    s.set_defaults(func=cmd_strategies)

    bench = sub.add_parser("bench", help="benchmarks (every arm on the same prompts, in one run)",
                           description="Benchmarks: every arm on the same prompts in one process.")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True, metavar="BENCHMARK")
    for modname in ("m2r2.bench.decode", "m2r2.bench.spec", "m2r2.bench.exit", "m2r2.bench.moe",
                    "m2r2.bench.family", "m2r2.bench.serve", "m2r2.bench.products"):
        _add_optional(modname, bsub)
    serve = _add_optional("m2r2.serving.cli", sub)
    if serve is not None:
        add_model_args(serve)
    for modname in ("m2r2.training.data", "m2r2.training.adapters", "m2r2.training.router", "m2r2.training.mod", "m2r2.bench.analyze", "m2r2.moe.cli",
                    "m2r2.family.cli"):
        _add_optional(modname, sub)
    return parser


def _add_optional(modname: str, sub):
    import importlib
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if not (e.name and modname.startswith(e.name)):  # a missing dependency inside is a real error
            raise
        return None
    return mod.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C may come while the parser imports torch and the subcommands: no traceback there either
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("m2r2: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .errors import M2R2Error

    args = build_parser().parse_args(_argv(argv))
    try:
        return int(args.func(args) or 0)
    except M2R2Error as e:
        print(f"m2r2: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
