"""Command-line option types and the parser every ``m2r2`` command and ``python -m m2r2.<module>`` entry point
uses: a usage mistake is one line ``m2r2: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def int_at_least(name: str, lo: int):
    """An argparse type: an integer >= ``lo``; the message names the flag."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {v}")
        return v
    return parse


def positive_int(name: str):
    return int_at_least(name, 0)


def float_in(name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False):
    """An argparse type: a finite number within [lo, hi] (``lo_open`` / ``hi_open``: that end excluded; None:
    unbounded); the message names the flag and the range."""
    import math

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if not math.isfinite(v) or below or above:
            if hi is None:
                want = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "a finite number"
            elif lo is None:
                want = f"{'<' if hi_open else '<='} {hi:g}"
            else:
                want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{name} must be {want}, got {s}")
        return v
    return parse


def int_list(name: str, lo: int | None = None, choices: tuple[int, ...] | None = None, text: bool = False):
    """An argparse type: comma-separated integers, each >= ``lo`` and among ``choices`` (when given). Returns a
    tuple, or with ``text`` the checked string itself (for code that splits it later)."""
    def parse(s: str):
        try:
            vals = tuple(int(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {s!r}") from None
        for v in vals:
            if lo is not None and v < lo:
                raise argparse.ArgumentTypeError(f"{name}: each value must be >= {lo}, got {v}")
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"{name}: each value must be one of "
                                                 f"{', '.join(map(str, choices))}, got {v}")
        return s if text else vals
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a usage mistake is one stderr line ``m2r2: error: ...`` and
    exit status 2 (argparse would print the whole usage first). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        flag, _, rest = one_line.partition(": ")  # "argument --x: --x must be ..." says the flag once
        if flag.startswith("argument ") and rest.startswith(flag[len("argument "):]):
            one_line = rest
        self.exit(2, f"m2r2: error: {one_line} (see {self.prog} --help)\n")


def run_standalone(prog: str, description: str, add_args, main_fn) -> None:
    """``python -m m2r2.<module>``: parse with ``add_args``, run ``main_fn``, user errors on one line."""
    from .errors import M2R2Error
    parser = ArgumentParser(prog=prog, description=description)
    add_args(parser)
    ns = parser.parse_args(argv())
    try:
        sys.exit(main_fn(ns))
    except M2R2Error as e:
        print(f"m2r2: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("m2r2: interrupted", file=sys.stderr)
        sys.exit(130)


def argv(argv: list[str] | None = None) -> list[str]:
    """The command line, every argument checked to be text: on POSIX, bytes that are not UTF-8 arrive as lone
    surrogates (PEP 383) and would otherwise fail deep inside (tokenizer, printing) with a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    for i, a in enumerate(args, 1):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            try:
                shown = a.encode("utf-8", "surrogateescape")  # the bytes as they were given
            except UnicodeEncodeError:
                shown = a.encode("utf-8", "backslashreplace")
            print(f"m2r2: error: argument {i} is not valid UTF-8: {shown[:60]!r}", file=sys.stderr)
            sys.exit(2)
    return args
