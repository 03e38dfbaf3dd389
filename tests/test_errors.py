"""Bad input gets a clear, typed error (and a one-line CLI message with a non-zero exit)."""

from __future__ import annotations

import json

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
    with pytest.raises(m2r2.SamplingError):
        tiny_lm.generate([], max_new_tokens=3)
    with pytest.raises(m2r2.SamplingError):
        tiny_lm.generate([5, 10_000], max_new_tokens=3)
    with pytest.raises(m2r2.SamplingError):
        tiny_lm.generate([5], max_new_tokens=-1)
    with pytest.raises(m2r2.SamplingError):
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
    with pytest.raises(SystemExit) as e:  # argparse rejects a malformed number itself
        main(["generate", "hi", "--max-new-tokens", "ten"])
    assert e.value.code == 2


def test_cli_generate_token_ids_json(tiny_dir, capsys):
    assert main(["generate", "5 6 7", "--token-ids", "--model", str(tiny_dir), "--max-new-tokens", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == [5, 6, 7] and len(out["token_ids"]) <= 5


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
