"""The one strategy registry: a user's strategy works by name from the API, ``decode`` and the command line;
every built-in option is reachable from the command line; options are checked the same way everywhere."""

import json
import sys
from dataclasses import dataclass

import pytest

import m2r2
from m2r2.cli import build_parser, main
from m2r2.decoding import registry
from m2r2.decoding.loop import decode
from m2r2.decoding.state import Strategy


class RepeatPlain(Strategy):
    """A user's strategy: plain decoding that also counts its steps, with one option."""

    name = "repeat-plain"

    def __init__(self, note: int):
        self.note = note

    def setup(self, state):
        self.steps = 0

    def step(self, state):
        logits = state.model(state.pending.view(-1, 1), state.cache, state.cache.lengths.view(-1, 1))[:, 0]
        state.cache.advance(1)
        state.pending = state.sampling.sample(logits, state.generator)
        self.steps += 1
        return [[t] for t in state.pending.tolist()]

    def stats(self):
        return {"user_steps": self.steps, "note": self.note}


@dataclass
class RepeatOptions(m2r2.Options):
    note: int = m2r2.option(7, "a number the strategy reports back", min=0)


def register_user_strategy():  # what a plugin's entry point calls
    m2r2.register_strategy("repeat-plain", lambda host, o: RepeatPlain(o.note), RepeatOptions,
                           help="plain decoding, the user's way")


@pytest.fixture
def user_strategy():
    register_user_strategy()
    yield "repeat-plain"
    registry.REGISTRY.pop("repeat-plain", None)


def test_a_registered_strategy_works_by_name_everywhere(tiny_lm, user_strategy):
    ids = [5, 9, 14, 3]
    plain = tiny_lm.generate(ids, max_new_tokens=8)
    by_name = tiny_lm.generate(ids, max_new_tokens=8, strategy="repeat-plain")
    assert by_name.token_ids == plain.token_ids and by_name.stats.extra == {"user_steps": 7, "note": 7}
    made = tiny_lm.strategy("repeat-plain", note=3)
    assert isinstance(made, RepeatPlain) and made.note == 3
    out, st = decode(tiny_lm.model, [ids], max_new_tokens=8, strategy="repeat-plain")
    assert out == [plain.token_ids] and st.strategy == "repeat-plain"
    with pytest.raises(m2r2.StrategyError, match="takes no option 'gamma'"):
        tiny_lm.strategy("repeat-plain", gamma=2)
    with pytest.raises(m2r2.StrategyError, match="note must be >= 0"):
        tiny_lm.strategy("repeat-plain", note=-1)
    with pytest.raises(m2r2.StrategyError, match="note must be an integer"):
        tiny_lm.strategy("repeat-plain", note="3")


def test_a_plugin_strategy_works_from_the_command_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """An installed package's entry point (group m2r2.strategies) registers it; the CLI offers it, with flags."""
    dist = tmp_path / "userstrat-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userstrat\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[m2r2.strategies]\nrepeat = test_registry:register_user_strategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setitem(sys.modules, "test_registry", sys.modules[__name__])
    try:
        rc = main(["generate", "--model", str(tiny_dir), "--token-ids", "5 9 14 3", "--max-new-tokens", "6",
                   "--strategy", "repeat-plain", "--note", "11", "--json"])
        assert rc == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["stats"]["strategy"] == "repeat-plain" and doc["stats"]["extra"]["note"] == 11
        rc = main(["generate", "--model", str(tiny_dir), "--token-ids", "5 9 14 3", "--max-new-tokens", "6",
                   "--strategy", "repeat-plain", "--opt", "note=4", "--json"])
        assert rc == 0 and json.loads(capsys.readouterr().out)["stats"]["extra"]["note"] == 4
        assert main(["strategies", "repeat-plain"]) == 0
        assert "note (int, default 7)" in capsys.readouterr().out
    finally:
        registry.REGISTRY.pop("repeat-plain", None)


def test_every_builtin_option_is_reachable_from_the_command_line():
    from m2r2 import strategies  # noqa: F401
    parser = build_parser()
    gen = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("generate"))
    flags = {s for a in gen._actions for s in a.option_strings}
    missing = []
    for name in registry.names():
        for f in registry.get(name).option_fields():
            if "--" + f.name.replace("_", "-") not in flags:
                missing.append(f"{name}.{f.name}")
    assert missing == []
    ns = gen.parse_args(["hi", "--strategy", "lookahead", "--window", "3", "--ngram", "5", "--no-adaptive",
                         "--opt", "max_gamma=9"])
    from m2r2.cli import strategy_options
    assert strategy_options(ns) == {"window": 3, "ngram": 5, "adaptive": False, "max_gamma": 9}


def test_options_are_checked_the_same_way_from_api_and_cli(tiny_lm, capsys):
    with pytest.raises(m2r2.StrategyError, match="gamma must be >= 1"):
        tiny_lm.strategy("prompt-lookup", gamma=0)
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--strategy", "prompt-lookup", "--gamma", "0"])
    assert e.value.code == 2 and "--gamma must be >= 1" in capsys.readouterr().err
    with pytest.raises(m2r2.StrategyError, match="unknown strategy 'nope'"):
        tiny_lm.generate([5, 6], strategy="nope")
    with pytest.raises(m2r2.StrategyError, match="kv must be one of"):
        tiny_lm.strategy("calm", kv="sometimes")
    strat = tiny_lm.strategy("lookahead", window=2, ngram=6)  # max_gamma grows to fit the n-grams
    assert strat.max_gamma == 8 and strat.gamma0 == 4
    assert tiny_lm.strategy("prompt-lookup", gamma=10).max_gamma == 10  # default max_gamma = max(8, gamma)
