"""``m2r2 bench serve``: its statistics on synthetic records, its option checking, the server subprocess
wrapper, and one tiny end-to-end run against m2r2's server (slow: starts real servers)."""

from __future__ import annotations

import json
import sys

import pytest

from m2r2 import cli
from m2r2.bench import serve


def rec(engine, c, i, pid, text, tokens=8, ttft=0.1, tpot=0.02, prompt_tokens=10, expected=10):
    return {"engine": engine, "concurrency": c, "request": i, "prompt_id": pid, "category": "x",
            "expected_prompt_tokens": expected, "prompt_tokens": prompt_tokens, "ttft_s": ttft, "tpot_s": tpot,
            "e2e_s": ttft + (tpot or 0) * (tokens - 1), "new_tokens": tokens, "chunks": tokens, "max_gap_s": tpot,
            "finish_reason": "length", "usage_reported": True, "text": text}


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert serve.percentile(xs, 50) == pytest.approx(2.5)
    assert serve.percentile(xs, 0) == 1.0 and serve.percentile(xs, 100) == 4.0
    assert serve.percentile(xs, 99) == pytest.approx(3 + 0.97)
    assert serve.percentile([5.0], 99) == 5.0
    assert serve.percentile([], 50) is None and serve.percentile([None], 50) is None


def test_summarize_levels_scaling_latency_and_equality():
    records = [rec("m2r2", 1, 0, "a", "A"), rec("m2r2", 1, 1, "b", "B"),
               rec("m2r2", 4, 0, "a", "A", ttft=0.3, tpot=0.04), rec("m2r2", 4, 1, "b", "B!", ttft=0.5, tpot=0.06),
               rec("llamacpp", 1, 0, "a", "A", tokens=10, prompt_tokens=11),
               rec("llamacpp", 1, 1, "b", "other", tokens=6, tpot=None)]
    levels = [{"engine": "m2r2", "concurrency": 1, "wall_s": 2.0},
              {"engine": "llamacpp", "concurrency": 1, "wall_s": 1.0},
              {"engine": "m2r2", "concurrency": 4, "wall_s": 0.5}]
    s = serve.summarize_serve(records, levels)
    assert s["reference"] == {"engine": "m2r2", "concurrency": 1}
    assert s["concurrency"] == [1, 4]
    m1, m4 = s["engines"]["m2r2"]["1"], s["engines"]["m2r2"]["4"]
    assert list(s["engines"]["m2r2"]) == ["1", "4"]
    assert m1["total_tokens"] == 16 and m1["aggregate_tokens_per_s"] == pytest.approx(8.0)
    assert m4["aggregate_tokens_per_s"] == pytest.approx(32.0) and m4["scaling"] == pytest.approx(4.0)
    assert m4["ttft_p50_s"] == pytest.approx(0.4) and m4["tpot_p99_s"] == pytest.approx(0.04 + 0.99 * 0.02)
    assert m1["equality"] == {"compared": 2, "identical": 2, "differing_prompts": []}
    assert m4["equality"] == {"compared": 2, "identical": 1, "differing_prompts": ["b"]}
    ll = s["engines"]["llamacpp"]["1"]
    assert ll["aggregate_tokens_per_s"] == pytest.approx(16.0) and ll["scaling"] == pytest.approx(1.0)
    assert ll["tpot_p50_s"] == pytest.approx(0.02)  # the 1-token-latency-less request is left out
    assert ll["prompt_token_mismatches"] == 1
    assert ll["equality"]["identical"] == 1 and ll["equality"]["differing_prompts"] == ["b"]
    header, rows = serve.serve_table(s)
    assert header[-1] == "same as m2r2 c=1"
    assert rows[0][-1] == "ref" and rows[1][-1] == "1/2" and rows[2][-1] == "1/2 (info)"
    md = serve.render_serve_markdown({"benchmark": "serve", "meta": {}, "summary": s})
    assert "| m2r2 | 4 |" in md and "differs from m2r2 c=1" in md


def test_summary_without_the_reference_engine():
    s = serve.summarize_serve([rec("llamacpp", 2, 0, "a", "A")], [{"engine": "llamacpp", "concurrency": 2,
                                                                   "wall_s": 1.0}])
    assert s["reference"] is None and "equality" not in s["engines"]["llamacpp"]["2"]
    assert serve.serve_table(s)[1][0][-1] == "-"


@pytest.mark.parametrize("argv, msg", [
    (["--concurrency", "1,x"], "--concurrency must be comma-separated integers"),
    (["--concurrency", "0,4"], "each value must be >= 1"),
    (["--concurrency", "4,4"], "a level twice"),
    (["--concurrency", ","], "at least one level"),
    (["--engines", "m2r2,vllm"], "--engines must be a comma-separated subset"),
    (["--engines", ""], "--engines must be a comma-separated subset"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--ctx-per-slot", "8"], "--ctx-per-slot must be >= 64"),
])
def test_bad_options_exit_2_with_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2r2: error: ") and msg in err and "\n" not in err


def test_defaults_parse():
    ns = cli.build_parser().parse_args(["bench", "serve"])
    assert ns.concurrency == (1, 4, 8, 16) and ns.engines == ("m2r2", "llamacpp")
    assert ns.max_new_tokens == 128 and ns.requests is None and ns.out == "serve" and ns.ctx_per_slot == 2048
    assert cli.build_parser().parse_args(["bench", "serve", "--concurrency", "8,1"]).concurrency == (1, 8)


def test_server_that_dies_at_start_is_one_clear_error(tmp_path):
    srv = serve.ServerProcess("fake", [sys.executable, "-c", "import sys; print('no such model', file=sys.stderr); "
                                       "sys.exit(3)"], serve.free_port(), tmp_path / "fake.log", timeout_s=30)
    with pytest.raises(serve.ServerStartError, match=r"exited with status 3.*fake\.log.*no such model"):
        srv.start()
    assert not srv.alive()


def test_server_that_never_gets_healthy_is_stopped(tmp_path):
    srv = serve.ServerProcess("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"], serve.free_port(),
                              tmp_path / "s.log", timeout_s=1)
    with pytest.raises(serve.ServerStartError, match="did not answer /health within 1 s"):
        srv.start()
    assert srv.proc is None  # stopped (and reaped)


@pytest.mark.slow
def test_tiny_end_to_end_run_against_m2r2(tmp_path, capsys):
    rc = cli.main(["bench", "serve", "--engines", "m2r2", "--concurrency", "1,2", "--requests", "2",
                   "--max-new-tokens", "8", "--limit", "2", "--bandwidth-mb", "8", "--out-dir", str(tmp_path),
                   "--out", "tiny", "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert (tmp_path / "tiny.md").read_text().startswith("# Benchmark: tiny")
    assert (tmp_path / "tiny.png").stat().st_size > 0
    assert set(doc) == {"benchmark", "meta", "records", "summary"}
    meta = doc["meta"]
    for key in ("git_commit", "git_dirty", "command", "start", "end", "threads", "max_new_tokens", "concurrency",
                "requests_per_level", "levels", "server_logs"):
        assert key in meta, key
    assert meta["concurrency"] == [1, 2] and meta["requests_per_level"] == 2 and meta["engines"] == ["m2r2"]
    assert [(lv["engine"], lv["concurrency"], lv["slots"]) for lv in meta["levels"]] == [("m2r2", 1, 1), ("m2r2", 2, 2)]
    assert len(doc["records"]) == 4
    for r in doc["records"]:
        assert r["engine"] == "m2r2" and 1 <= r["new_tokens"] <= 8 and r["usage_reported"]
        assert r["prompt_tokens"] == r["expected_prompt_tokens"]
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    lv = doc["summary"]["engines"]["m2r2"]
    assert set(lv) == {"1", "2"} and lv["1"]["scaling"] == pytest.approx(1.0)
    for s in lv.values():
        assert s["aggregate_tokens_per_s"] > 0 and s["ttft_p50_s"] is not None and s["tpot_p99_s"] is not None
    # greedy decoding: the same text at concurrency 2 as at 1, for each prompt
    assert lv["2"]["equality"] == {"compared": 2, "identical": 2, "differing_prompts": []}
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["engines"]["m2r2"]["2"]["identical"] == "2/2"
