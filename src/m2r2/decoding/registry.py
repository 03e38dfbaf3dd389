"""The one strategy registry: ``{name: StrategySpec(options dataclass, factory)}``.

Every way of asking for a strategy reads it: ``lm.generate(strategy="name")``, ``lm.strategy("name",
**options)``, ``decode(model, strategy="name")``, the command line (``m2r2 generate --strategy NAME``, with
its flags generated from the options dataclasses, or ``--opt key=value``), ``m2r2 strategies`` and the
benchmarks. A strategy's options are a dataclass: its fields are the option names, types and defaults,
``option(...)`` metadata carries help text and range checks, and ``validate`` any check that needs the model.

A user's strategy is one ``register_strategy`` call (or, for the command line, an entry point in the group
``m2r2.strategies`` naming a function that makes the call; ``load_plugins`` runs them)::

    @dataclass
    class GreedyTwiceOptions(m2r2.Options):
        repeat: int = m2r2.option(2, "tokens per step", min=1)

    m2r2.register_strategy("greedy-twice", lambda host, opts: GreedyTwice(opts.repeat), GreedyTwiceOptions,
                           help="...", lossless=False)
    lm.generate("Hi", strategy="greedy-twice")

Chosen over an argument-parsing library (simple_parsing, tyro): the options are already dataclasses, the
command line needs only their field names, types, defaults and help, and the checks must raise m2r2's
one-line errors for the API and the CLI alike; ~150 lines of introspection do that with no dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import StrategyError
from .plain import PlainStrategy
from .state import Strategy

ENTRY_POINT_GROUP = "m2r2.strategies"


class Host(Protocol):
    """What a strategy factory may use: the model, where it came from (``source.identity`` selects the
    artifacts trained for it; None for a bare model) and a per-model memo for loaded artifacts."""

    model: Any
    source: Any
    artifacts: dict


@dataclass
class BareHost:
    """A model without a loaded ``LM`` around it (``decode(model, strategy="name")``)."""

    model: Any
    source: Any = None
    artifacts: dict = field(default_factory=dict)


def option(default: Any, help: str = "", *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False) -> Any:
    """A strategy option's dataclass field: default, help text, and the checks every caller gets (a value
    among ``choices``; within [min, max], ``min_open`` excluding min)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "min_open": min_open})


@dataclass
class Options:
    """Base class of strategy options (no fields: a strategy without options)."""

    def validate(self, host: Host) -> None:
        """Checks that need the model (depth ranges, ...); raise ``StrategyError``."""


@dataclass(frozen=True)
class OptionSpec:
    """One option of a strategy: its dataclass field (default, ``option`` metadata) and the base types its
    annotation allows (an unresolvable annotation: the default's type) and whether it may be None."""

    field: dataclasses.Field
    kinds: frozenset
    nullable: bool

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def metadata(self):
        return self.field.metadata

    @property
    def type_name(self) -> str:
        return "/".join(sorted(k.__name__ for k in self.kinds)) + ("|None" if self.nullable else "")


def _option_spec(f: dataclasses.Field, tp) -> OptionSpec:
    if tp is None:
        return OptionSpec(f, frozenset({type(f.default)}), f.default is None)
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return OptionSpec(f, frozenset(a for a in args if a is not type(None)), type(None) in args)


@dataclass(frozen=True)
class StrategySpec:
    name: str
    options: type
    factory: Callable[[Host, Any], Strategy]
    help: str = ""
    lossless: bool = False  # greedy output identical to plain decoding

    def option_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.options))

    @functools.cached_property
    def option_specs(self) -> dict[str, OptionSpec]:
        """Every option by name, its annotation resolved once."""
        try:
            hints = typing.get_type_hints(self.options)
        except Exception:  # an annotation that does not resolve: accept any value of the default's type
            hints = {}
        return {f.name: _option_spec(f, hints.get(f.name)) for f in dataclasses.fields(self.options)}

    def option(self, key: str) -> OptionSpec:
        opt = self.option_specs.get(key)
        if opt is None:
            raise StrategyError(f"strategy {self.name} takes no option {key!r} "
                                f"(its options: {', '.join(self.option_specs) or 'none'})")
        return opt


REGISTRY: dict[str, StrategySpec] = {}
_plugins_loaded = False


def register_strategy(name: str, factory: Callable[[Host, Any], Strategy], options: type = Options, *,
                      help: str = "", lossless: bool = False) -> StrategySpec:
    """Register (or replace) strategy ``name``: ``factory(host, options)`` returns a fresh ``Strategy`` for
    one decode call; ``options`` is a dataclass (subclass of ``Options``) of its settings."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise StrategyError(f"a strategy name is a non-empty word, got {name!r}")
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise StrategyError(f"strategy {name}: options must be a dataclass type, got {options!r}")
    if not callable(factory):
        raise StrategyError(f"strategy {name}: the factory must be callable")
    spec = StrategySpec(name, options, factory, help, lossless)
    REGISTRY[name] = spec
    return spec


def load_plugins() -> None:
    """Run every ``m2r2.strategies`` entry point (once): installed packages registering their strategies."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as e:  # a broken plugin must not take the built-in strategies down with it
            print(f"m2r2: warning: strategy plugin {ep.name} ({ep.value}) failed to load: {e}", file=sys.stderr)


def names() -> list[str]:
    load_plugins()
    return list(REGISTRY)


def get(name: str) -> StrategySpec:
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        load_plugins()
        spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise StrategyError(f"unknown strategy {name!r} (available: {', '.join(REGISTRY)})")
    return spec


def check_value(where: str, opt: OptionSpec, value):
    """``value`` for option ``opt``, converted where harmless (int -> float, a path -> str) and checked; errors
    start with ``where`` (the strategy and option, or the command-line flag)."""
    kinds = opt.kinds
    if value is None:
        if opt.nullable or not kinds:
            return None
        raise StrategyError(f"{where} needs a value")
    if isinstance(value, os.PathLike) and str in kinds:
        value = os.fspath(value)
    if bool in kinds:
        if not isinstance(value, bool):
            raise StrategyError(f"{where} must be true or false, got {value!r}")
    elif int in kinds and float not in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StrategyError(f"{where} must be an integer, got {value!r}")
    elif float in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StrategyError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    elif str in kinds and not isinstance(value, str):
        raise StrategyError(f"{where} must be text, got {value!r}")
    md = opt.metadata
    if md.get("choices") is not None and value not in md["choices"]:
        raise StrategyError(f"{where} must be one of {', '.join(map(str, md['choices']))}, got {value!r}")
    lo, hi = md.get("min"), md.get("max")
    if lo is not None and (value <= lo if md.get("min_open") else value < lo):
        raise StrategyError(f"{where} must be {'>' if md.get('min_open') else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise StrategyError(f"{where} must be <= {hi:g}, got {value!r}")
    return value


def make_options(name: str, values: dict | None = None, host: Host | None = None) -> Options:
    """Strategy ``name``'s options from ``values`` (keyword -> value), every value checked; an option the
    strategy does not take is an error naming the ones it does."""
    spec = get(name)
    values = dict(values or {})
    unknown = [k for k in values if k not in spec.option_specs]
    if unknown:
        takes = ", ".join(spec.option_specs) or "none"
        raise StrategyError(f"strategy {name} takes no option {', '.join(map(repr, unknown))} (its options: {takes})")
    checked = {k: check_value(f"strategy {name}: {k.replace('_', ' ')}", spec.option_specs[k], v)
               for k, v in values.items()}
    opts = spec.options(**checked)
    if host is not None and hasattr(opts, "validate"):
        opts.validate(host)
    return opts


def create(name: str, host_or_model, **values) -> Strategy:
    """A fresh strategy ``name`` for one decode call, from checked options."""
    host = host_or_model if hasattr(host_or_model, "artifacts") else BareHost(host_or_model)
    spec = get(name)
    opts = make_options(name, values, host)
    try:
        strat = spec.factory(host, opts)
    except ValueError as e:  # a strategy's own argument checks (e.g. gamma > max_gamma)
        if isinstance(e, StrategyError):
            raise
        raise StrategyError(f"strategy {name}: {e}") from None
    if not isinstance(strat, Strategy):
        raise StrategyError(f"strategy {name}'s factory returned {type(strat).__name__}, not a Strategy")
    return strat


def parse_value(name: str, key: str, text: str):
    """A command-line string for option ``key`` of strategy ``name``, as the option's type."""
    opt = get(name).option(key)
    return check_value(f"--opt {key}", opt, parse_text(opt, text, f"--opt {key}"))


def parse_text(opt: OptionSpec, text: str, flag: str):
    """A command-line string as option ``opt``'s type (not yet checked: ``check_value``)."""
    kinds = opt.kinds
    s = text.strip()
    if opt.nullable and s.lower() in ("none", "null", ""):
        return None
    if bool in kinds:
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise StrategyError(f"{flag} must be true or false, got {text!r}")
    if int in kinds and float not in kinds:
        try:
            return int(s)
        except ValueError:
            raise StrategyError(f"{flag} must be an integer, got {text!r}") from None
    if float in kinds:
        try:
            return float(s)
        except ValueError:
            raise StrategyError(f"{flag} must be a number, got {text!r}") from None
    return text


def describe(name: str) -> str:
    """One strategy's help: what it does and each option with its type and default."""
    spec = get(name)
    lines = [f"{spec.name}{' (lossless)' if spec.lossless else ''}: {spec.help}"]
    for opt in spec.option_specs.values():
        md = opt.metadata
        extra = f"; one of {', '.join(map(str, md['choices']))}" if md.get("choices") else ""
        lines.append(f"    {opt.name} ({opt.type_name}, default {opt.field.default!r}{extra}): {md.get('help', '')}")
    return "\n".join(lines)


register_strategy("plain", lambda host, opts: PlainStrategy(), help="one full forward per token (the reference)",
                  lossless=True)
