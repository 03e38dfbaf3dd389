"""The benchmark harness and ``m2r2 bench decode`` on a tiny random Llama (runs in seconds)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import m2r2
from m2r2.engine import native
from m2r2 import provenance
from m2r2.bench import report, runner, stats
from m2r2.bench.args import load_prompt_ids
from m2r2.bench.arms import ArmResult, ArmSpec, ArmUnavailable, BenchPrompt
from m2r2.bench.decode import HFGenerateArm, M2R2PlainArm, add_parser
from m2r2.bench.report import write_results
from m2r2.bench.runner import run_benchmark
from m2r2.bench.stats import summarize
from m2r2.errors import M2R2Error, PromptFileError


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """The brief's tiny random Llama (2 layers, no tokenizer), saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bench_lm(bench_dir):
    return m2r2.load(bench_dir)


@pytest.fixture(autouse=True)
def restore_threads():
    """Benchmarks pin torch's thread count; give later tests back the count they started with."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


PROMPTS = [BenchPrompt("p1", "math", (5, 6, 7, 8)), BenchPrompt("p2", "math", (9, 10, 11)),
           BenchPrompt("p3", "writing", (12, 13, 14, 15, 16))]


class FakeArm:
    """Records every call in a shared log; takes ``speed`` tokens/s."""

    kind = "m2r2"

    def __init__(self, name: str, log: list, speed: float = 10.0, unavailable: bool = False):
        self.name, self.log, self.speed, self.unavailable = name, log, speed, unavailable
        self.closed = False

    def setup(self) -> None:
        if self.unavailable:
            raise ArmUnavailable("not here")

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        self.log.append((prompt.id, self.name))
        return ArmResult(max_new_tokens, max_new_tokens / self.speed, [1] * max_new_tokens, max_new_tokens)

    def close(self) -> None:
        self.closed = True


def test_run_benchmark_interleaves_warms_up_and_skips():
    log: list = []
    arms = [FakeArm("a", log, 10), FakeArm("b", log, 20), FakeArm("c", log, unavailable=True)]
    skipped: dict = {}
    warm = BenchPrompt("w", "warmup", (1, 2))
    recs = run_benchmark(arms, PROMPTS, 4, warmup=1, repeats=3, progress=False, warmup_prompt=warm, skipped=skipped,
                         isolate=False)  # in this process, so the shared log sees every call
    assert skipped == {"c": "not here"}
    assert log[:2] == [("w", "a"), ("w", "b")]  # warm-up first, on the warm-up prompt
    measured = log[2:]
    # every arm runs a prompt (all repeats) before any arm moves to the next prompt
    blocks = [measured[i:i + 6] for i in range(0, len(measured), 6)]
    assert [{p for p, _ in b} for b in blocks] == [{"p1"}, {"p2"}, {"p3"}]
    assert all({a for _, a in b} == {"a", "b"} for b in blocks)
    assert blocks[0][0][1] != blocks[1][0][1]  # the starting arm rotates
    assert [(r["arm"], r["prompt_id"]) for r in recs] == [(a, p.id) for a in "ab" for p in PROMPTS]
    assert all(math.isclose(r["tokens_per_s"], {"a": 10, "b": 20}[r["arm"]]) for r in recs)
    assert all(len(r["extra"]["seconds_all"]) == 3 for r in recs)
    assert arms[0].closed and arms[1].closed and not arms[2].closed
    assert "w" not in {r["prompt_id"] for r in recs}


def _rec(arm, pid, cat, tokens, seconds, ids=None, passes=None, kind="m2r2"):
    return {"arm": arm, "kind": kind, "prompt_id": pid, "category": cat, "prompt_tokens": 3,
            "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "forward_passes": passes, "token_ids": ids, "extra": {}}


def synthetic_records():
    return [
        _rec("base", "1", "x", 10, 1.0, [1, 2, 3], 10, "external"),  # 10 tok/s
        _rec("base", "2", "x", 20, 1.0, [4, 5], 20, "external"),  # 20
        _rec("base", "3", "y", 30, 1.0, [6], 30, "external"),  # 30
        _rec("fast", "1", "x", 10, 0.5, [1, 2, 3], 5),  # 20 -> ratio 2
        _rec("fast", "2", "x", 20, 0.125, [4, 9], 10),  # 160 -> ratio 8
        _rec("fast", "3", "y", 30, 0.5, [6, 7], 15),  # 60 -> ratio 2
        _rec("ext", "1", "x", 10, 2.0),  # 5, no token ids
    ]


def test_summarize_by_hand():
    s = summarize(synthetic_records(), "base", reference_arm="base", also_against=["fast"],
                  roofline_tokens_per_s=100.0, arm_rooflines={"ext": 10.0})
    fast = s["arms"]["fast"]
    a = fast["all"]
    assert a["n"] == 3 and a["total_tokens"] == 60 and math.isclose(a["total_seconds"], 1.125)
    assert math.isclose(a["median_tokens_per_s"], 60) and math.isclose(a["mean_tokens_per_s"], 80)
    assert math.isclose(a["aggregate_tokens_per_s"], 60 / 1.125)
    assert math.isclose(a["tokens_per_forward_pass"], 2.0)
    r = a["ratios"]["base"]
    assert math.isclose(r["geomean"], (2 * 8 * 2) ** (1 / 3)) and math.isclose(r["median"], 2) and r["n"] == 3
    assert "fast" not in a["ratios"]  # no ratio of an arm to itself
    cx = fast["by_category"]["x"]
    assert cx["n"] == 2 and math.isclose(cx["ratios"]["base"]["geomean"], 4) and math.isclose(cx["median_tokens_per_s"], 90)
    assert math.isclose(fast["roofline_fraction"], 0.6)
    # equality with the reference: prompt 1 identical, 2 differs at index 1, 3 is a longer continuation
    eq = fast["equality"]
    assert eq["compared"] == 3 and eq["identical"] == 1
    assert {m["prompt_id"]: m["first_diff"] for m in eq["mismatches"]} == {"2": 1, "3": 1}
    ext = s["arms"]["ext"]
    assert ext["equality"]["compared"] == 0 and ext["all"]["tokens_per_forward_pass"] is None
    assert math.isclose(ext["roofline_fraction"], 0.5)  # its own roofline
    assert math.isclose(ext["all"]["ratios"]["base"]["geomean"], 0.5)
    assert math.isclose(ext["all"]["ratios"]["fast"]["geomean"], 0.25)
    assert "equality" not in s["arms"]["base"]
    # a baseline that did not run: no ratios, no failure
    s2 = summarize(synthetic_records(), "missing")
    assert s2["arms"]["fast"]["all"]["ratios"] == {}


def test_write_results_schema(tmp_path, capsys):
    recs = synthetic_records()
    s = summarize(recs, "base", reference_arm="base", roofline_tokens_per_s=100.0)
    roof = {"bandwidth_gbps": 10.0, "bytes_per_param": 4.0, "weight_bytes_per_token": 1e8, "tokens_per_s": 100.0}
    paths = write_results("unit", {"bandwidth_gbps": 10.0, "roofline": roof}, recs, s, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert set(doc) == {"benchmark", "meta", "records", "summary"} and doc["benchmark"] == "unit"
    for key in ("cpu", "cores", "threads", "torch", "transformers", "date", "command", "bandwidth_gbps", "roofline"):
        assert key in doc["meta"], key
    assert len(doc["records"]) == len(recs) and "token_ids" not in doc["records"][0]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| arm |" in md and "tok/s median" in md and "by category" in md
    out = capsys.readouterr()
    line = json.loads(out.out.strip().splitlines()[-1])
    assert line["benchmark"] == "unit" and "fast" in line["arms"]
    assert "tok/s median" in out.err


def test_bandwidth_and_roofline(bench_lm):
    assert provenance.pin_threads(1) == 1 and provenance.machine_info()["threads"] == 1
    bw = provenance.measure_bandwidth(size_mb=8, repeats=3, warmup=1)
    assert bw > 0
    roof = provenance.roofline(bench_lm.config, bw)
    assert math.isclose(roof["tokens_per_s"], bw * 1e9 / bench_lm.config.weight_bytes_per_token(4.0))


def test_m2r2_and_hf_arms_agree_on_tiny_model(bench_lm):
    prompts = [BenchPrompt("a", "all", (3, 17, 99, 4, 17, 99)), BenchPrompt("b", "all", (200, 1, 7))]
    arms = [M2R2PlainArm(bench_lm), HFGenerateArm(bench_lm), HFGenerateArm(bench_lm, "hf-pld", 3)]
    recs = run_benchmark(arms, prompts, 12, progress=False, isolate=False)
    by = {(r["arm"], r["prompt_id"]): r for r in recs}
    for p in prompts:
        m, h, pld = by["m2r2-plain", p.id], by["hf-generate", p.id], by["hf-pld", p.id]
        assert m["token_ids"] == h["token_ids"] == pld["token_ids"]
        assert m["new_tokens"] == len(m["token_ids"]) > 0
        # one forward per token: prefill yields the first, each later step one more
        assert m["forward_passes"] == h["forward_passes"] == m["new_tokens"]
    s = summarize(recs, "hf-generate", reference_arm="hf-generate")
    assert s["arms"]["m2r2-plain"]["equality"]["identical"] == 2


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="bench_cmd", required=True))
    return parser.parse_args(["decode", *argv])


def test_decode_command_end_to_end(bench_dir, tmp_path, capsys):
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"id": f"q{i}", "category": c, "token_ids": t})
                             for i, (c, t) in enumerate([("a", [5, 6, 7]), ("b", [8, 9, 10, 11])])) + "\n")
    args = _parse(["--model", str(bench_dir), "--prompt-ids", str(ids), "--max-new-tokens", "6", "--threads", "1",
                   "--out", "tiny", "--out-dir", str(tmp_path), "--no-progress", "--bandwidth-mb", "8"])
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["meta"]["skipped_arms"].keys() == {"llamacpp", "m2r2-gguf"}  # a directory model has no GGUF
    assert doc["meta"]["arms"] == ["m2r2-plain", "m2r2-torch", "m2r2-fp16", "m2r2-int8", "m2r2-quant-draft",
                                   "hf-generate", "hf-pld"]
    assert doc["meta"]["native_kernels"] == native.available()
    arms = doc["summary"]["arms"]
    for lossless in ("m2r2-plain", "m2r2-torch", "m2r2-quant-draft"):
        assert arms[lossless]["equality"] == {"compared": 2, "identical": 2, "mismatches": [], "near_ties": 0}
        assert arms[lossless]["rouge_l"] == 1.0
    assert 0 <= arms["m2r2-int8"]["rouge_l"] <= 1 and "rouge_l" not in arms["hf-generate"]
    assert "Rouge-L vs hf-generate" in (tmp_path / "tiny.md").read_text()
    # the reduced-precision arms are measured against the roofline of the bytes they read
    fp32_roof = doc["summary"]["roofline_tokens_per_s"]
    assert arms["m2r2-plain"]["roofline_tokens_per_s"] == fp32_roof
    assert arms["m2r2-fp16"]["roofline_tokens_per_s"] == pytest.approx(2 * fp32_roof, rel=0.05)
    assert arms["m2r2-int8"]["roofline_tokens_per_s"] == pytest.approx(4 * fp32_roof, rel=0.1)
    assert [r["extra"]["strategy"]["draft_weights"] for r in doc["records"] if r["arm"] == "m2r2-quant-draft"] \
        == ["int8", "int8"]
    assert doc["summary"]["arms"]["m2r2-plain"]["all"]["ratios"].keys() == {"hf-generate"}
    assert doc["summary"]["arms"]["hf-pld"]["all"]["ratios"].keys() == {"hf-generate", "m2r2-plain"}
    assert (tmp_path / "tiny.md").is_file() and (tmp_path / "tiny.png").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "tiny"


def test_decode_errors(bench_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token_ids": "nope"}\n')
    with pytest.raises(PromptFileError):
        load_prompt_ids(bad)
    with pytest.raises(PromptFileError):
        load_prompt_ids(tmp_path / "missing.jsonl")
    args = _parse(["--model", str(bench_dir), "--prompts", str(tmp_path / "missing.jsonl"), "--threads", "1",
                   "--out-dir", str(tmp_path), "--bandwidth-mb", "8"])
    with pytest.raises(PromptFileError):
        args.func(args)
    # text prompts need a tokenizer; the tiny model has none
    args = _parse(["--model", str(bench_dir), "--threads", "1", "--limit", "1", "--out-dir", str(tmp_path)])
    with pytest.raises(M2R2Error):
        args.func(args)
    good = tmp_path / "good.jsonl"
    good.write_text('{"token_ids": [1, 2, 3]}\n')
    args = _parse(["--model", str(bench_dir), "--prompt-ids", str(good), "--arms", "m2r2-plain,nope", "--threads", "1"])
    with pytest.raises(M2R2Error, match="unknown arm"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parse(["--max-new-tokens", "0"])


def test_spec_command_end_to_end(bench_dir, bench_lm, tmp_path, capsys, monkeypatch):
    """Every drafter on the same loop and verifier: lossless (token-equal to plain), with drafting stats
    (which the arms report as data, as they do from their workers; run here, to keep the test short: the
    worker path is tested by the decode command and the process tests)."""
    import functools

    from m2r2.stream.accelerator import Accelerator
    from m2r2.bench import spec as spec_mod
    from m2r2.bench.spec import add_parser as add_spec
    monkeypatch.setattr(spec_mod, "run_benchmark", functools.partial(run_benchmark, isolate=False))

    acc = Accelerator.for_model(bench_lm.model, bench_lm.source.identity, rate=2, rank=4)
    with torch.no_grad():
        for a in acc.adapters:
            a.up.weight.normal_(0, 0.05)
    acc.save(tmp_path / "adapter")
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"id": f"q{i}", "category": c, "token_ids": t}) for i, (c, t) in
                             enumerate([("a", [5, 6, 7, 5, 6, 7, 5]), ("b", [8, 9, 10, 11]), ("b", [3])])) + "\n")
    parser = argparse.ArgumentParser()
    add_spec(parser.add_subparsers(dest="bench_cmd", required=True))
    args = parser.parse_args(["spec", "--model", str(bench_dir), "--prompt-ids", str(ids), "--max-new-tokens", "24",
                              "--threads", "1", "--arms", "m2r2,m2r2-tree,m2r2-r3,early-exit,quant-draft,prompt-lookup",
                              "--adapter", str(tmp_path / "adapter"), "--per-category", "1",
                              "--out", "spec", "--out-dir", str(tmp_path), "--no-progress", "--bandwidth-mb", "8"])
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "spec.json").read_text())
    assert doc["meta"]["n_prompts"] == 2  # one per category
    assert doc["meta"]["arms"] == ["m2r2-plain", "m2r2", "m2r2-tree", "early-exit", "quant-draft", "prompt-lookup"]
    assert "m2r2-r3" in doc["meta"]["skipped_arms"]  # no rate-3 adapter for this model
    for arm in ("m2r2", "m2r2-tree", "early-exit", "quant-draft", "prompt-lookup"):
        assert doc["summary"]["arms"][arm]["equality"]["identical"] == 2
        spec = doc["summary"]["speculative"][arm]["all"]
        assert spec["verify_steps"] > 0 and spec["tokens_per_verify"] >= 1
        # the cost model: tokens per verification over the step's drafting + verifying time
        assert spec["cost_model_speedup"] == pytest.approx(spec["tokens_per_verify"] / spec["step_cost"])
    tree, chain = (doc["summary"]["speculative"][a]["all"] for a in ("m2r2-tree", "m2r2"))
    assert tree["nodes_per_verify"] > tree["drafts_per_verify"]  # leaves beside the chain
    assert chain["nodes_per_verify"] == pytest.approx(chain["drafts_per_verify"])
    assert doc["summary"]["speculative"]["prompt-lookup"]["draft_cost_bytes"] == 0.0
    assert 0 < doc["summary"]["speculative"]["early-exit"]["draft_cost_bytes"] < 1
    assert doc["summary"]["speculative"]["quant-draft"]["draft_cost_bytes"] == pytest.approx(0.25)  # int8: all layers
    md = (tmp_path / "spec.md").read_text()
    assert "Speculative decoding" in md and "cost model" in md


def test_exit_command_end_to_end(bench_dir, bench_lm, tmp_path):
    """Threshold sweep: an impossible threshold reproduces the plain output (Rouge-L 1, full depth); a
    trivial one exits every token at the first checked depth."""
    from m2r2.stream.accelerator import Accelerator
    from m2r2.bench.exit import add_parser as add_exit

    Accelerator.for_model(bench_lm.model, bench_lm.source.identity, rate=2, rank=4).save(tmp_path / "adapter")
    from m2r2.baselines.mod import MoDConfig, MoDRouters
    mod = MoDRouters(MoDConfig(bench_lm.config.hidden_size, 2, [1], bench_lm.source.identity))
    mod.quantiles.fill_(1.0)  # every score (0) is below: any skip > 0 skips block 1 for every token
    mod.save(tmp_path / "mod")
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"id": f"q{i}", "token_ids": t}) for i, t in
                             enumerate([[5, 6, 7, 5, 6], [8, 9, 10, 11]])) + "\n")
    parser = argparse.ArgumentParser()
    add_exit(parser.add_subparsers(dest="bench_cmd", required=True))
    args = parser.parse_args(["exit", "--model", str(bench_dir), "--prompt-ids", str(ids), "--max-new-tokens", "12",
                              "--threads", "1", "--thresholds", "1.01,0.0001", "--skip-min-layers", "2,1",
                              "--methods", "calm,m2r2-exit,m2r2-exit-conf,skipdecode,mod", "--adapter", str(tmp_path / "adapter"),
                              "--mod-skip", "0,0.5", "--mod-routers", str(tmp_path / "mod"),
                              "--out", "exit", "--out-dir", str(tmp_path), "--no-progress", "--bandwidth-mb", "8"])
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "exit.json").read_text())
    c = doc["summary"]["curves"]
    for kv in ("recompute", "propagate"):
        for m in ("calm", "m2r2-exit-conf"):
            never = c[f"{m}@1.01/{kv}"]
            assert never["rouge_l"] == 1.0 and never["exit_rate"] == 0 and never["mean_slow_layers"] == 2
        assert c[f"calm@0.0001/{kv}"]["exit_rate"] == 1.0 and c[f"calm@0.0001/{kv}"]["mean_slow_layers"] == 1
    assert doc["summary"]["arms"]["calm@1.01/recompute"]["equality"]["identical"] == 2
    assert c["skipdecode@2/none"]["rouge_l"] == 1.0 and c["skipdecode@1/none"]["mean_slow_layers"] < 2
    assert c["mod@0/kvproj"]["rouge_l"] == 1.0 and c["mod@0/kvproj"]["mean_slow_layers"] == 2
    assert c["mod@0.5/kvproj"]["mean_slow_layers"] == 1
    assert (tmp_path / "exit-curve.png").is_file()
    assert "no ARLA router" in doc["meta"]["skipped_arms"]["m2r2-exit@1.01/recompute"]


def test_exit_curves_score_against_reference_answers_where_a_prompt_has_one(bench_lm):
    """Rouge-L vs the reference is averaged over the prompts that have one; plain gets its own row (the
    ceiling to read the others against)."""
    from m2r2.bench.exit import curves

    def rec(arm, pid, ids):
        return {"arm": arm, "prompt_id": pid, "token_ids": ids,
                "extra": {"strategy": {"tokens": len(ids), "mean_slow_layers": 1.0, "exited": len(ids)}}}
    records = [rec("plain", "a", [5, 6, 7]), rec("plain", "b", [8, 9]),
               rec("calm@0.5/propagate", "a", [5, 6, 7]), rec("calm@0.5/propagate", "b", [1, 2])]
    summary = {"arms": {"calm@0.5/propagate": {"all": {"ratios": {"plain": {"geomean": 1.5}}}}}}
    text = lambda ids: bench_lm.decode_text(ids) or " ".join(map(str, ids))  # noqa: E731
    c = curves(records, bench_lm, summary, {"a": text([5, 6, 7])})
    assert c["plain"]["rouge_l_reference"] == 1.0 and c["plain"]["n_reference"] == 1
    assert c["calm@0.5/propagate"]["rouge_l_reference"] == 1.0  # only prompt a has a reference
    assert c["calm@0.5/propagate"]["rouge_l"] < 1.0  # prompt b differs from plain
    assert curves(records, bench_lm, summary)["calm@0.5/propagate"]["rouge_l_reference"] is None


# ---------------------------------------------------------------- one worker process per arm

class ProbeArm:
    """Reports the process and torch thread count it runs under; ``fail`` makes setup or run go wrong."""

    kind = "m2r2"

    def __init__(self, name: str, fail: str | None = None):
        self.name, self.fail = name, fail

    def setup(self) -> None:
        if self.fail == "unavailable":
            raise ArmUnavailable("not here")
        if self.fail == "setup":
            raise RuntimeError("broken setup")
        if self.fail == "user":
            raise M2R2Error("a user mistake found in the worker")

    def run(self, prompt: BenchPrompt, max_new_tokens: int) -> ArmResult:
        if self.fail == "die":
            import os
            os._exit(3)
        import os
        return ArmResult(max_new_tokens, 0.01, [1] * max_new_tokens, None,
                         {"pid": os.getpid(), "threads": torch.get_num_threads()})

    def close(self) -> None:
        pass


def test_process_arms_run_in_their_own_pinned_workers_and_skip_unavailable(capsys):
    import os
    provenance.pin_threads(1)
    torch.set_num_threads(2)  # this process's own setting must survive the run
    skipped: dict = {}
    arms = [ProbeArm("a"), ProbeArm("b"), ProbeArm("c", "unavailable")]
    recs = run_benchmark(arms, PROMPTS[:2], 3, warmup=1, progress=False, skipped=skipped)
    assert skipped == {"c": "not here"}
    assert "skipping arm c: not here" in capsys.readouterr().err
    pids = {a: {r["extra"]["pid"] for r in recs if r["arm"] == a} for a in "ab"}
    assert len(pids["a"]) == len(pids["b"]) == 1 and pids["a"] != pids["b"]
    assert os.getpid() not in pids["a"] | pids["b"]
    assert {r["extra"]["threads"] for r in recs} == {1}  # the pinned count, in every worker
    assert torch.get_num_threads() == 2


def test_process_arm_failures_are_clear():
    with pytest.raises(runner.ArmWorkerError, match=r"arm x: its worker process died \(exit code 3\) while running"):
        run_benchmark([ProbeArm("ok"), ProbeArm("x", "die")], PROMPTS[:1], 2, warmup=0, progress=False)
    with pytest.raises(runner.ArmWorkerError, match="arm y failed in its worker process while setting up: "
                                                     "RuntimeError: broken setup"):
        run_benchmark([ProbeArm("y", "setup")], PROMPTS[:1], 2, warmup=0, progress=False)
    with pytest.raises(M2R2Error, match="a user mistake found in the worker"):  # user errors stay themselves
        run_benchmark([ProbeArm("z", "user")], PROMPTS[:1], 2, warmup=0, progress=False)


def test_process_mode_gives_the_in_process_tokens(bench_dir):
    """m2r2 and transformers arms, each built from its description in its own worker, produce exactly what
    they produce here."""
    from m2r2.bench.decode import make_arm
    provenance.pin_threads(1)
    specs = [ArmSpec(n, "m2r2", make_arm, {"name": n, "model": str(bench_dir), "threads": 1, "n_ctx": 64,
                                            "pld_tokens": 3, "llamacpp_token_ids": False})
             for n in ("m2r2-plain", "hf-generate")]
    prompts = [BenchPrompt("a", "all", (3, 17, 99, 4, 17, 99)), BenchPrompt("b", "all", (200, 1, 7))]
    isolated = run_benchmark(specs, prompts, 10, warmup=0, progress=False)
    here = run_benchmark(specs, prompts, 10, warmup=0, progress=False, isolate=False)
    key = lambda recs: [(r["arm"], r["prompt_id"], r["token_ids"], r["forward_passes"]) for r in recs]  # noqa: E731
    assert key(isolated) == key(here) and all(len(r["token_ids"]) == 10 for r in here)


# ---------------------------------------------------------------- provenance

def test_provenance_is_read_at_the_start_and_warns(monkeypatch, tmp_path, capsys):
    from m2r2 import provenance
    monkeypatch.setattr(provenance, "_git_state", lambda: {"git_commit": "c0ffee" * 6 + "abcd", "git_dirty": True,
                                                        "git_dirty_count": 1, "git_dirty_files": ["src/m2r2/x.py"]})
    monkeypatch.setattr(provenance.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    provenance.pin_threads(1)
    start = provenance.run_start(8)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "dirty" in err[0] and "load 3.50" in err[0]
    assert start["git_dirty"] and start["loadavg"] == [3.5, 2.0, 1.0] and start["bandwidth_gbps"] > 0
    # the tree becomes clean and the machine quiet during the run: the result still says how it started
    monkeypatch.setattr(provenance, "_git_state", lambda: {"git_commit": "f" * 40, "git_dirty": False,
                                                        "git_dirty_count": 0, "git_dirty_files": []})
    monkeypatch.setattr(provenance.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    provenance.run_end(8)
    recs = synthetic_records()
    paths = write_results("prov", {}, recs, summarize(recs, "base"), tmp_path)
    meta = json.loads(paths["json"].read_text())["meta"]
    assert meta["git_dirty"] is True and meta["git_commit"].startswith("c0ffee")
    assert meta["start"]["loadavg"][0] == 3.5 and meta["end"]["loadavg"][0] == 0.5
    assert meta["end"]["bandwidth_gbps"] > 0 and meta["command"] == start["command"]
    md = paths["md"].read_text()
    assert "**dirty tree** (src/m2r2/x.py)" in md and "at start: load 3.50/2.00/1.00" in md and "at end: load 0.50" in md
    # a clean, quiet start: no warning
    capsys.readouterr()
    provenance.run_start(8)
    assert capsys.readouterr().err == ""


def test_git_state_counts_untracked_sources(tmp_path, monkeypatch):
    from m2r2 import provenance
    import subprocess
    repo = tmp_path / "repo"
    (repo / "src" / "pkg").mkdir(parents=True)
    mod = repo / "src" / "pkg" / "provenance.py"
    mod.write_text("x = 1\n")
    result = repo / "benchmarks" / "results" / "decode.json"
    result.parent.mkdir(parents=True)
    result.write_text("{}\n")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(provenance, "__file__", str(mod))
    assert provenance._git_state()["git_dirty"] is False
    (repo / "notes.txt").write_text("not code")  # untracked outside src/: still clean
    assert provenance._git_state()["git_dirty"] is False
    (repo / "src" / "pkg" / "new.py").write_text("y = 2\n")
    st = provenance._git_state()
    assert st["git_dirty"] is True and st["git_dirty_files"] == ["src/pkg/new.py (untracked)"]
    mod.write_text("x = 2\n")  # and a modified tracked file, named from the repository root
    st = provenance._git_state()
    assert st["git_dirty_count"] == 2 and st["git_dirty_files"] == ["src/pkg/provenance.py", "src/pkg/new.py (untracked)"]
    mod.write_text("x = 1\n")
    (repo / "src" / "pkg" / "new.py").unlink()
    result.write_text('{"a": 1}\n')  # an earlier run's result, not committed yet: output, not source
    st = provenance._git_state()
    assert st["git_dirty"] is False and st["results_changed"] == ["benchmarks/results/decode.json"]


# ---------------------------------------------------------------- Rouge-L and near ties

class EmojiLM:
    """decode_text for Rouge-L: token ids 1-9 are emoji (one each), others words."""

    def decode_text(self, ids):
        return "".join(chr(0x1F600 + t) if 0 < t < 10 else f" w{t}" for t in ids)


def test_rouge_l_scores_identical_outputs_1_even_when_all_emoji():
    recs = [_rec("ref", "p", "x", 3, 1.0, [1, 2, 3]), _rec("same", "p", "x", 3, 1.0, [1, 2, 3]),
            _rec("other", "p", "x", 3, 1.0, [1, 2, 4]), _rec("ref", "q", "x", 2, 1.0, [20, 21]),
            _rec("same", "q", "x", 2, 1.0, [20, 21]), _rec("other", "q", "x", 2, 1.0, [20, 21])]
    s = summarize(recs, "ref", reference_arm="ref")
    stats.add_rouge_l(s, recs, EmojiLM())
    assert s["arms"]["same"]["rouge_l"] == 1.0
    # all-emoji texts differ in one of three token ids: scored on the ids as words, 2/3
    assert s["arms"]["other"]["rouge_l"] == pytest.approx((2 / 3 + 1) / 2, rel=1e-12)
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert stats.rouge_l(scorer, "\U0001F600", "\U0001F600") == 1.0  # identical texts, no ids
    assert stats.rouge_l(scorer, "a b c", "a b d") == pytest.approx(2 / 3, rel=1e-12)


def test_near_ties_measure_the_reference_gap_at_the_first_difference(bench_lm, monkeypatch):
    prompt = BenchPrompt("p", "x", (5, 6, 7))
    ref_out = bench_lm.generate(list(prompt.token_ids), max_new_tokens=4, temperature=0.0).token_ids
    other = ref_out[:2] + [(ref_out[2] + 1) % 256, 0]
    recs = [_rec("ref", "p", "x", 4, 1.0, ref_out), _rec("same", "p", "x", 4, 1.0, list(ref_out)),
            _rec("lossy", "p", "x", 4, 1.0, other)]
    s = summarize(recs, "ref", reference_arm="ref")
    stats.add_near_ties(s, recs, [prompt], bench_lm)
    m = s["arms"]["lossy"]["equality"]["mismatches"][0]
    assert s["arms"]["lossy"]["equality"]["identical"] == 0 and s["arms"]["same"]["equality"]["near_ties"] == 0
    # the gap agrees with m2r2's own float32 logits at that position, to float32 noise relative to the logits
    logits = bench_lm.model.forward(torch.tensor([list(prompt.token_ids) + ref_out[:2]]),
                                    bench_lm.model.new_cache(1, 16), torch.arange(5).unsqueeze(0)).double()[0, -1]
    top = torch.topk(logits, 2).values
    assert m["top2_gap"] == pytest.approx(float(top[0] - top[1]), abs=1e-5 * float(logits.abs().max()))
    assert 0 < m["float32_noise"] < 1e-4 * float(logits.abs().max())
    assert m["near_tie"] is (m["top2_gap"] < stats.NEAR_TIE_FACTOR * m["float32_noise"])
    # a gap inside the noise counts as a near tie, separately from exact identity
    monkeypatch.setattr(stats, "top2_gaps", lambda hf_dir, ctxs: [{"gap": 1e-7, "float32_noise": 1e-6}] * len(ctxs))
    s = summarize(recs, "ref", reference_arm="ref")
    stats.add_near_ties(s, recs, [prompt], bench_lm)
    assert s["arms"]["lossy"]["equality"]["near_ties"] == 1 and s["arms"]["lossy"]["equality"]["identical"] == 0
    header, rows = report.summary_table(s)
    assert "near-tie divergences" in header and rows[2][header.index("near-tie divergences")] == "1/1"
    assert rows[2][header.index("same as ref")] == "0/1"


# ---------------------------------------------------------------- input validation before any setup

@pytest.mark.parametrize("ids, message", [([5, 256], "token id 256 outside"), ([5, -1], "non-negative integer"),
                                          ([5, 1.5], "non-negative integer"), ([5, True], "non-negative integer"),
                                          ([], "non-negative integer"), (list(range(200)) * 2, "context window")])
def test_bad_prompt_ids_fail_before_any_arm_is_built(bench_dir, tmp_path, monkeypatch, capsys, ids, message):
    from m2r2.bench import decode
    from m2r2.cli import main as cli_main
    f = tmp_path / "ids.jsonl"
    f.write_text(json.dumps({"id": "q", "token_ids": ids}) + "\n")

    def no_setup(*a, **k):
        raise AssertionError("arms were built before the inputs were checked")
    monkeypatch.setattr(decode, "make_arms", no_setup)
    assert cli_main(["bench", "decode", "--model", str(bench_dir), "--prompt-ids", str(f), "--threads", "1",
                     "--out-dir", str(tmp_path), "--bandwidth-mb", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("m2r2: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_empty_prompt_id_file_fails_before_any_arm_is_built(bench_dir, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    args = _parse(["--model", str(bench_dir), "--prompt-ids", str(f), "--threads", "1", "--out-dir", str(tmp_path),
                   "--bandwidth-mb", "8"])
    with pytest.raises(PromptFileError, match="no prompts"):
        args.func(args)


def test_moe_command_end_to_end(bench_dir, bench_lm, tmp_path):
    """m2r2 bench moe on a MoEfied tiny model: every strategy reproduces the all-resident output under a budget and
    a modelled link, with Q4_1 experts; the table reports each against LRU, the oracle and all-resident, and the
    all-resident step against the dense one; the process keeps its CPUs."""
    import os

    from conftest import random_moefication

    from m2r2.bench.moe import add_parser as add_moe
    from m2r2.stream.accelerator import Accelerator
    random_moefication(bench_lm, 4, 2, seed=0).save(tmp_path / "moe")
    acc = Accelerator.for_model(bench_lm.model, bench_lm.source.identity, rate=2, rank=4)
    acc.save(tmp_path / "adapter")
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"id": f"q{i}", "category": "a", "token_ids": t})
                             for i, t in enumerate([[5, 6, 7, 5], [8, 9, 10, 11, 3]])) + "\n")
    parser = argparse.ArgumentParser()
    add_moe(parser.add_subparsers(dest="bench_cmd", required=True))
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    args = parser.parse_args(["moe", "--model", str(bench_dir), "--moe", str(tmp_path / "moe"), "--adapter",
                              str(tmp_path / "adapter"), "--prompt-ids", str(ids), "--max-new-tokens", "6",
                              "--budget", "0.5", "--bandwidth", "20", "--expert-format", "q4_1",
                              "--calibration-prompts", "0", "--out", "moe", "--out-dir", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    if before is not None:
        assert os.sched_getaffinity(0) == before
    doc = json.loads((tmp_path / "moe.json").read_text())
    assert doc["meta"]["expert_format"] == "q4_1" and doc["meta"]["dense_tokens_per_s"] > 0
    by = doc["summary"]["link 20 GB/s 50 us"]["50%"]
    from m2r2.bench.moe import STRATEGIES
    assert set(by) == set(STRATEGIES)
    for s, agg in by.items():
        assert agg["identical_to_resident"] == 2, s
        assert agg["of_resident"] is not None and agg["of_oracle"] is not None
    assert by["oracle"]["precision"] == 1.0 and by["on-demand-lru"]["loads_per_token"] > 0
    assert "of oracle" in (tmp_path / "moe.md").read_text()
