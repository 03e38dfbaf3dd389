"""Bad input gets a clear, typed error (and a one-line CLI message with a non-zero exit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import m2r2
from m2r2.cli import main
from m2r2.prompts import load_prompts


def test_missing_model_dir(tmp_path):
    with pytest.raises(m2r2.ModelNotFoundError):
        m2r2.load(tmp_path / "nope")


def test_dir_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(m2r2.UnsupportedModelError, match="config.json"):
        m2r2.load(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(m2r2.UnsupportedModelError, match="gpt2"):
        m2r2.load(tmp_path)


def test_corrupt_weights(tmp_path):
    from conftest import make_tiny
    make_tiny(tmp_path, "llama")
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: 1000])
    with pytest.raises(m2r2.UnsupportedModelError, match="corrupt|unreadable"):
        m2r2.load(tmp_path)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(m2r2.UnsupportedModelError, match="GGUF"):
        m2r2.load(f)


def test_empty_prompt_and_bad_ids(tiny_lm):
    with pytest.raises(m2r2.PromptError):
        tiny_lm.generate([], max_new_tokens=3)
    with pytest.raises(m2r2.PromptError):
        tiny_lm.generate([5, 10_000], max_new_tokens=3)
    with pytest.raises(m2r2.SamplingError):
        tiny_lm.generate([5], max_new_tokens=-1)
    with pytest.raises(m2r2.StrategyError):
        tiny_lm.generate([5], max_new_tokens=3, strategy="nonsense")
    with pytest.raises(m2r2.M2R2Error, match="tokenizer"):
        tiny_lm.generate("text needs a tokenizer", max_new_tokens=3)


def test_prompt_too_long(tiny_lm):
    with pytest.raises(m2r2.ContextLengthError, match="context window"):
        tiny_lm.generate([5] * 300, max_new_tokens=3)


def test_prompt_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(m2r2.PromptFileError, match="no prompts"):
        load_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no known field"}\n')
    with pytest.raises(m2r2.PromptFileError, match="no prompt"):
        load_prompts(bad)
    with pytest.raises(m2r2.PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"turns": ["a", "b"]}\n{"instruction": "c"}\n{"Instruction": "d"}\n{"prompt": "e"}\n')
    assert [r.text for r in load_prompts(ok)] == ["a", "c", "d", "e"]
    assert len(load_prompts("mt-bench")) == 80
    assert len(load_prompts("koala")) == 180
    assert len(load_prompts("spec-bench")) == 480


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_dir):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2r2: error:") and err.count("\n") == 1
    assert main(["generate", "5 6 7", "--token-ids", "--model", str(tiny_dir), "--temperature", "-2"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse rejects a malformed number itself, on one line too
        main(["generate", "hi", "--max-new-tokens", "ten"])
    assert e.value.code == 2
    assert "--max-new-tokens" in _one_line(capsys.readouterr().err)


def test_cli_generate_token_ids_json(tiny_dir, tiny_lm, capsys):
    """The CLI's JSON carries what the API generates for the same ids: at least one token, and fewer than
    the budget only when the model stopped."""
    assert main(["generate", "5 6 7", "--token-ids", "--model", str(tiny_dir), "--max-new-tokens", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = tiny_lm.generate([5, 6, 7], max_new_tokens=5)
    assert out["prompt_token_ids"] == [5, 6, 7]
    assert out["token_ids"] == ref.token_ids and 1 <= len(out["token_ids"]) <= 5
    assert out["finish_reason"] == ref.finish_reason == ("length" if len(ref.token_ids) == 5 else "stop")


def test_cli_generate_weights_and_quant_draft(tiny_dir, capsys):
    """--strategy quant-draft keeps plain decoding's tokens; --weights fp16 runs and says so on stderr."""
    base = ["generate", "5 6 7", "--token-ids", "--model", str(tiny_dir), "--max-new-tokens", "12", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(base + ["--strategy", "quant-draft", "--draft-weights", "fp16"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain
    assert main(base + ["--weights", "fp16"]) == 0
    assert "fp16 weights" in capsys.readouterr().err


def test_prompt_formats_keep_all_prompt_text(tmp_path):
    """Every supported format keeps its whole prompt: Alpaca's input and self-instruct's first instance input
    are joined to the instruction with a blank line; an empty input leaves the instruction alone."""
    rows = [
        {"question_id": 1, "turns": ["first turn", "second turn"]},  # MT-Bench: the first turn
        {"id": "k", "prompt": "a prompt"},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},  # Alpaca
        {"instruction": "Say hi.", "input": "", "output": "hi"},  # Alpaca, no input
        {"instruction": "Sort the list.", "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"},
                                                        {"input": "9, 8", "output": "8, 9"}]},  # self-instruct
        {"instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}]},
        {"Instruction": "Summarise.", "Input": "A long text."},  # Koala's original release
        {"Instruction": "Tell a joke."},
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recs = load_prompts(f)
    assert [r.text for r in recs] == [
        "first turn", "a prompt", "Translate to French.\n\nGood morning", "Say hi.", "Sort the list.\n\n3, 1, 2",
        "Name a colour.", "Summarise.\n\nA long text.", "Tell a joke."]
    assert [r.reference for r in recs][2:6] == ["Bonjour", "hi", "1, 2, 3", "red"]


def test_prompt_file_with_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(m2r2.PromptFileError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_prompts(f)


def _one_line(err: str) -> str:
    """The CLI's contract for a user mistake: exactly one non-empty stderr line, ``m2r2: error: ...``."""
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("m2r2: error: ") and lines[0][len("m2r2: error: "):].strip(), err
    return lines[0]


BAD_ARGS = [  # (argv, a fragment the message must name)
    ([], "COMMAND"),
    (["nosuch"], "nosuch"),
    (["generate"], "prompt"),
    (["generate", "hi", "--bogus"], "--bogus"),
    (["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "hi", "--max-new-tokens", "ten"], "--max-new-tokens"),
    (["generate", "hi", "--top-k", "-1"], "--top-k"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--seed", "-3"], "--seed"),
    (["generate", "hi", "--gamma", "0"], "--gamma"),
    (["generate", "hi", "--skip", "2"], "--skip"),
    (["generate", "hi", "--threshold", "-0.5"], "--threshold"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--strategy", "nonsense"], "--strategy"),
    (["generate", "hi", "--rate", "5"], "--rate"),
    (["generate", "hi", "--threads", "-1"], "--threads"),
    (["generate", "hi", "--weights", "int3"], "--weights"),
    (["bench"], "BENCHMARK"),
    (["bench", "decode", "--limit", "-1"], "--limit"),
    (["bench", "decode", "--threads", "0"], "--threads"),
    (["bench", "spec", "--gamma", "0"], "--gamma"),
    (["data", "--n", "0"], "--n"),
    (["data", "--temperature", "-1"], "--temperature"),
    (["train"], "--data"),
    (["train", "--data", "d", "--threads", "-1"], "--threads"),
    (["train", "--data", "d", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--data", "d", "--lr", "0"], "--lr"),
    (["train", "--data", "d", "--steps", "-5"], "--steps"),
    (["train", "--data", "d", "--rank", "0"], "--rank"),
    (["train", "--data", "d", "--rate", "5"], "--rate"),
    (["train", "--data", "d", "--max-grad-norm", "-1"], "--max-grad-norm"),
    (["train", "--data", "d", "--kl-weight", "inf"], "--kl-weight"),
    (["train", "--data", "d", "--kl-layers", "0,x"], "--kl-layers"),
    (["train", "--data", "d", "--kl-layers", "0"], "--kl-layers"),
    (["train-router", "--data", "d", "--rate", "7"], "--rate"),
    (["train-router", "--data", "d", "--epochs", "0"], "--epochs"),
    (["train-router", "--data", "d", "--lr", "-1"], "--lr"),
    (["train-mod", "--data", "d", "--out", "o", "--ridge", "-1"], "--ridge"),
    (["train-mod", "--data", "d", "--out", "o", "--val-sequences", "0"], "--val-sequences"),
    (["analyze", "--rate", "2,9"], "--rate"),
    (["analyze", "--limit", "0"], "--limit"),
    (["moefy", "--experts", "1"], "--experts"),
    (["moefy", "--eval-top-k", "two"], "--eval-top-k"),
    (["moefy", "--ridge", "-1"], "--ridge"),
    (["family-data", "--vocab-size", "10"], "--vocab-size"),
    (["family-data", "--seed", "-1"], "--seed"),
    (["family-train", "--threads", "-1"], "--threads"),
    (["family-train", "--budget", "0"], "--budget"),
    (["family-train", "--warmup", "1.5"], "--warmup"),
    (["family-train", "--n-layers", "0"], "--n-layers"),
]


@pytest.mark.parametrize("argv,names", BAD_ARGS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGS])
def test_cli_usage_errors_are_one_line(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert names in _one_line(err)


def _run(args: list, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_standalone_module_usage_errors_are_one_line():
    r = _run(["-m", "m2r2.training.adapters", "--data", "d", "--steps", "ten"])
    assert r.returncode == 2
    assert "--steps" in _one_line(r.stderr)


def test_cli_prompt_argument_with_invalid_utf8():
    """A prompt that is not UTF-8 (arriving as surrogate escapes) is named on one line, before any model loads."""
    r = subprocess.run([sys.executable, "-c", "import sys; from m2r2.cli import main; sys.exit(main())",
                        "generate", b"\xff\xfehi", "--max-new-tokens", "1"], capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and r.stdout == b""
    assert "argument 2 is not valid UTF-8" in _one_line(err)


def test_ctrl_c_while_importing_torch(tmp_path):
    """The console script imports ``m2r2`` and then calls ``main``; a Ctrl-C while torch loads prints one line
    and exits 130 (a finder on the import path raises KeyboardInterrupt when torch is imported)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, _CtrlC())\n")
    src = str(Path(m2r2.errors.__file__).parents[1])
    path = os.pathsep.join([str(tmp_path), src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = _run(["-c", "import sys; from m2r2.cli import main; sys.exit(main())", "generate", "hi"],
             {"PYTHONPATH": path})
    assert r.returncode == 130, r.stderr
    assert r.stderr == "m2r2: interrupted\n"


def test_api_bad_settings_raise_typed_errors(tiny_lm):
    with pytest.raises(m2r2.StrategyError, match="ngram"):
        tiny_lm.strategy("prompt-lookup", max_ngram=0)
    with pytest.raises(m2r2.PromptError, match="token ids"):
        tiny_lm.generate(["not", "ids"], max_new_tokens=3)
    with pytest.raises(m2r2.StrategyError, match="gamma"):
        tiny_lm.strategy("early-exit", gamma=0)
