"""``m2r2 bench serve``: m2r2's OpenAI-compatible server (``m2r2 serve``) against llama.cpp's own server
(llama-server, through xllamacpp) on the same GGUF, the same prompts and the same token budget, at several
concurrency levels.

How it measures:

- **One server at a time.** For each concurrency level ``c`` and each engine, a server is started in a
  subprocess of its own (free port, stderr to a log file, ready when its ``/health`` answers 200), measured,
  and stopped before the next one starts: the two engines never share the CPU. Levels run in order and, within
  a level, the engines one after the other, so the two numbers of one level are taken minutes apart, not a
  whole benchmark apart.
- **Slots = concurrency.** At level ``c`` both servers get ``c`` slots (m2r2 ``--parallel c``; llama.cpp
  ``n_parallel = c`` with ``n_ctx = c x --ctx-per-slot``, since llama-server splits its context among slots)
  and the same per-slot context. A server is sized for the load it serves, as an operator would size it; a
  fixed slot count would leave slots idle at low concurrency (free for m2r2, whose batch is the active slots,
  but llama.cpp's n_ctx and HTTP pool would be sized for a load that never comes).
- **Same input.** Every request goes to ``/v1/completions`` as the chat-templated prompt's token ids (m2r2's
  tokenizer, ``lm.encode``), so no engine applies a chat template of its own; each record keeps the prompt
  token count the server reports (``usage.prompt_tokens``) next to the count sent, and the summary counts
  mismatches. Greedy (temperature 0), ``max_tokens = --max-new-tokens``; llama.cpp's prompt cache is off
  (``cache_prompt: false``) so that a repeated prompt pays its prefill as in m2r2.
- **Threads.** ``--threads`` (default: the CPUs this process may use) for both engines' compute.
- **Client.** The driver is this process: asyncio + httpx, ``c`` concurrent clients, each taking the next
  prompt from one shared list (cycling when the requests outnumber the prompts) until ``--requests`` requests
  are done. Default: max(2 x the largest level, 16) requests at *every* level, the same prompts in the same
  order, so every level does the same work and every output has its reference at c=1. Before a level's clock
  starts, ``--warmup`` requests (default 1, a prompt outside the set) go to the fresh server.
- **Per request** (streamed with ``stream_options.include_usage``): time to first token (send to the first
  chunk with text), per-token latency (first chunk to the final chunk / (tokens - 1): the time per token after
  the first), tokens generated (``usage.completion_tokens``; EOS included when produced; chunk count if a
  server gives no usage), end-to-end time, the longest gap between chunks, and the output text.
- **Per level**: aggregate tokens/s (total tokens / wall time from the first request sent to the last one
  done), scaling vs the engine's lowest level, TTFT and per-token latency p50/p99 (linear interpolation), and
  output equality: each output text against m2r2's at the lowest level (c=1 by default) for the same prompt.
  For m2r2 that is exactness across concurrency; llama.cpp reads the same GGUF through its own (quantized)
  kernels while m2r2 dequantizes it to float32, so its agreement with m2r2 is information only.

Results: ``<out-dir>/<out>.json`` (benchmark, meta with provenance, records = one per request, summary),
``.md`` (engine x concurrency table) and ``.png`` (aggregate tokens/s vs concurrency, and latency). Server
logs go to a temporary directory named in the meta and in any start-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import M2R2Error
from ..options import int_at_least, int_list
from .arms import BenchPrompt
from .report import _fmt, md_table, provenance_lines, text_table

ENGINES = ("m2r2", "llamacpp")
DEFAULT_CONCURRENCY = "1,4,8,16"
REFERENCE_ENGINE = "m2r2"


# ---------------------------------------------------------------- statistics (pure)

def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def reference_texts(records: Sequence[dict], engine: str, concurrency: int) -> dict[str, str]:
    """Output text per prompt id of ``engine`` at ``concurrency`` (the first request of each prompt)."""
    out: dict[str, str] = {}
    for r in records:
        if r["engine"] == engine and r["concurrency"] == concurrency:
            out.setdefault(r["prompt_id"], r["text"])
    return out


def summarize_level(records: Sequence[dict], wall_s: float, reference: dict[str, str] | None) -> dict:
    """One (engine, concurrency) level: totals, aggregate tokens/s, latency percentiles, output equality."""
    tokens = sum(r["new_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    tpot = [r["tpot_s"] for r in records if r["tpot_s"] is not None]
    e2e = [r["e2e_s"] for r in records]
    out = {"requests": len(records), "total_tokens": tokens, "wall_s": wall_s,
           "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
           "mean_tokens_per_request": tokens / len(records) if records else 0.0,
           "prompt_token_mismatches": sum(1 for r in records if r.get("prompt_tokens") is not None
                                          and r["prompt_tokens"] != r["expected_prompt_tokens"]),
           "finish_reasons": {}}
    for r in records:
        fr = str(r.get("finish_reason"))
        out["finish_reasons"][fr] = out["finish_reasons"].get(fr, 0) + 1
    if reference is not None:
        compared = [r for r in records if r["prompt_id"] in reference]
        diff = [r for r in compared if r["text"] != reference[r["prompt_id"]]]
        out["equality"] = {"compared": len(compared), "identical": len(compared) - len(diff),
                           "differing_prompts": sorted({r["prompt_id"] for r in diff})}
    return out


def summarize_serve(records: Sequence[dict], levels: Sequence[dict]) -> dict:
    """Per engine and concurrency level (``levels``: {engine, concurrency, wall_s, ...} per measured level):
    ``summarize_level`` plus scaling vs the engine's lowest level. The reference for output equality is
    ``REFERENCE_ENGINE`` at its lowest measured level (None when it did not run)."""
    ref_levels = sorted(lv["concurrency"] for lv in levels if lv["engine"] == REFERENCE_ENGINE)
    ref_c = ref_levels[0] if ref_levels else None
    ref = reference_texts(records, REFERENCE_ENGINE, ref_c) if ref_c is not None else None
    engines: dict[str, dict] = {}
    for lv in levels:
        eng, c = lv["engine"], lv["concurrency"]
        rows = [r for r in records if r["engine"] == eng and r["concurrency"] == c]
        s = summarize_level(rows, lv["wall_s"], ref)
        s["slots"] = lv.get("slots", c)
        engines.setdefault(eng, {})[str(c)] = s
    for eng, by_c in engines.items():
        base_c = min(by_c, key=int)
        base = by_c[base_c]["aggregate_tokens_per_s"]
        for s in by_c.values():
            s["scaling"] = s["aggregate_tokens_per_s"] / base if base > 0 else None
            s["scaling_base"] = int(base_c)
        engines[eng] = dict(sorted(by_c.items(), key=lambda kv: int(kv[0])))
    return {"engines": engines, "concurrency": sorted({lv["concurrency"] for lv in levels}),
            "reference": {"engine": REFERENCE_ENGINE, "concurrency": ref_c} if ref_c is not None else None}


def serve_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    ref = summary.get("reference")
    header = ["engine", "c", "requests", "tok/s (aggregate)", "scaling", "TTFT p50 ms", "TTFT p99 ms",
              "per-token p50 ms", "per-token p99 ms",
              f"same as {ref['engine']} c={ref['concurrency']}" if ref else "identical"]
    rows = []
    for eng, by_c in summary["engines"].items():
        for c, s in by_c.items():
            eq = s.get("equality")
            is_ref = ref is not None and eng == ref["engine"] and int(c) == ref["concurrency"]
            same = ("ref" if is_ref else f"{eq['identical']}/{eq['compared']}" if eq and eq["compared"] else "-")
            if eq and eng != REFERENCE_ENGINE and not is_ref and eq["compared"]:
                same += " (info)"
            ms = lambda x: None if x is None else 1000 * x  # noqa: E731
            rows.append([eng, c, str(s["requests"]), _fmt(s["aggregate_tokens_per_s"]),
                         _fmt(s.get("scaling"), ".2f", "x"), _fmt(ms(s["ttft_p50_s"]), ".0f"),
                         _fmt(ms(s["ttft_p99_s"]), ".0f"), _fmt(ms(s["tpot_p50_s"]), ".1f"),
                         _fmt(ms(s["tpot_p99_s"]), ".1f"), same])
    return header, rows


# ---------------------------------------------------------------- result files

def render_serve_markdown(doc: dict) -> str:
    meta, summary = doc["meta"], doc["summary"]
    lines = [f"# Benchmark: {doc['benchmark']}", "",
             f"- machine: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('threads')} threads per server; "
             f"torch {meta.get('torch')}, xllamacpp {meta.get('xllamacpp')}",
             f"- date: {meta.get('date')}; command: `{meta.get('command')}`", *provenance_lines(meta)]
    for key in ("model", "gguf", "prompts", "n_prompts", "max_new_tokens", "requests_per_level", "ctx_per_slot",
                "endpoint", "isolation"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    if meta.get("skipped_engines"):
        lines.append("- skipped: " + "; ".join(f"{a} ({why})" for a, why in meta["skipped_engines"].items()))
    lines += ["", "Slots = concurrency c for both servers. Aggregate tok/s = tokens generated by all requests of the "
              "level / wall time of the level; scaling = that over the engine's lowest level. TTFT = request sent to "
              "first streamed text; per-token = (last chunk - first chunk) / (tokens - 1) per request. "
              "Same as = output texts equal to the reference's for the same prompt (for llama.cpp, which runs "
              "the GGUF's quantized weights, information only).", "", md_table(*serve_table(summary))]
    mism = [(e, c, p) for e, by_c in summary["engines"].items() for c, s in by_c.items()
            for p in s.get("equality", {}).get("differing_prompts", [])]
    if mism:
        ref = summary["reference"]
        lines += ["", f"## Prompts whose output differs from {ref['engine']} c={ref['concurrency']}", "",
                  md_table(["engine", "c", "prompt"], [[e, c, p] for e, c, p in mism])]
    return "\n".join(lines) + "\n"


def render_serve_chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = doc["summary"]
    colors = {"m2r2": "tab:blue", "llamacpp": "tab:gray"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for eng, by_c in summary["engines"].items():
        cs = [int(c) for c in by_c]
        col = colors.get(eng, "tab:orange")
        ax.plot(cs, [by_c[str(c)]["aggregate_tokens_per_s"] for c in cs], "o-", color=col, label=eng)
        for c in cs:
            ax.annotate(f"{by_c[str(c)]['aggregate_tokens_per_s']:.0f}", (c, by_c[str(c)]["aggregate_tokens_per_s"]),
                        xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7, color=col)
        def ms(k: str) -> list[float]:
            return [float("nan") if by_c[str(c)][k] is None else 1000 * by_c[str(c)][k] for c in cs]
        ax2.plot(cs, ms("tpot_p50_s"), "o-", color=col, label=f"{eng} per-token p50")
        ax2.plot(cs, ms("tpot_p99_s"), "o:", color=col, alpha=0.6, label=f"{eng} per-token p99")
        ax2.plot(cs, ms("ttft_p50_s"), "s--", color=col, label=f"{eng} TTFT p50")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(summary["concurrency"], [str(c) for c in summary["concurrency"]])
        a.set_xlabel("concurrency (clients = slots)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{doc['benchmark']}: throughput", fontsize=10)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.set_ylabel("ms")
    ax2.set_title("latency", fontsize=10)
    meta = doc["meta"]
    fig.suptitle(f"{meta.get('cpu')} · {meta.get('threads')} threads · {meta.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_serve_results(name: str, meta: dict, records: Sequence[dict], summary: dict,
                        out_dir: str | os.PathLike = "benchmarks/results") -> dict[str, Path]:
    """``<out_dir>/<name>.json`` (benchmark, meta, records, summary), ``.md`` and ``.png`` rendered from it; the
    table to stderr and one JSON summary line to stdout (as ``report.write_results``)."""
    from ..provenance import machine_info
    from .report import SCHEMA_VERSION

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "meta": {"schema_version": SCHEMA_VERSION, **machine_info(), **meta},
           "records": list(records), "summary": summary}
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(render_serve_markdown(doc), encoding="utf-8")
    render_serve_chart(doc, paths["png"])
    print("\n" + text_table(*serve_table(summary)), file=sys.stderr)
    print(f"results in {paths['json']} (.md, .png)", file=sys.stderr)
    line = {"benchmark": name, "json": str(paths["json"]),
            "engines": {e: {c: {"aggregate_tokens_per_s": s["aggregate_tokens_per_s"],
                                **({"identical": f"{s['equality']['identical']}/{s['equality']['compared']}"}
                                   if "equality" in s else {})} for c, s in by_c.items()}
                        for e, by_c in summary["engines"].items()}}
    print(json.dumps(line), flush=True)
    return paths


# ---------------------------------------------------------------- server subprocesses

class ServerStartError(M2R2Error):
    """A server subprocess exited or never became healthy."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


class ServerProcess:
    """One server in a subprocess of its own (own session: a Ctrl-C reaches only this process, which stops it
    in ``stop``), output to ``log``; ``start`` returns once its ``/health`` answers 200, or raises
    ``ServerStartError`` with the log's last lines if the process exits or ``timeout_s`` passes."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None,
                 timeout_s: float = 300.0):
        self.name, self.cmd, self.port, self.log, self.env, self.timeout_s = name, cmd, port, log, env, timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_healthy(t0 + self.timeout_s)
        except BaseException:  # a failed start or a Ctrl-C while waiting: never leave the server running
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, deadline: float) -> None:
        import httpx

        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"the {self.name} server exited with status {code} while starting "
                                       f"(log {self.log}): {_log_tail(self.log)}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise ServerStartError(f"the {self.name} server did not answer /health within {self.timeout_s:.0f} s "
                                       f"(log {self.log}): {_log_tail(self.log)}")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 15 s; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - nothing to undo
            pass
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _child_env() -> dict:
    """The servers import the same m2r2 source as this process (PYTHONPATH first)."""
    import m2r2
    src = str(Path(m2r2.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def m2r2_server(args: argparse.Namespace, slots: int, log: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "m2r2.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(slots), "--threads", str(args.threads), "--ctx-size", str(args.ctx_per_slot),
           "--max-queue", str(max(64, 2 * slots))]
    if args.model:
        cmd += ["--model", str(args.model)]
    return ServerProcess("m2r2", cmd, port, log, env=_child_env(), timeout_s=args.startup_timeout)


def llamacpp_server(args: argparse.Namespace, gguf: Path, slots: int, log: Path) -> ServerProcess:
    port = free_port()
    script = Path(__file__).with_name("llama_server.py")
    cmd = [sys.executable, str(script), "--gguf", str(gguf), "--port", str(port), "--parallel", str(slots),
           "--ctx-per-slot", str(args.ctx_per_slot), "--threads", str(args.threads)]
    return ServerProcess("llamacpp", cmd, port, log, env=_child_env(), timeout_s=args.startup_timeout)


# ---------------------------------------------------------------- client driver

class RequestFailed(M2R2Error):
    pass


def request_body(engine: str, prompt: BenchPrompt, max_new_tokens: int) -> dict:
    body = {"prompt": list(prompt.token_ids), "max_tokens": max_new_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if engine == "llamacpp":
        body["cache_prompt"] = False
    return body


async def stream_request(client, url: str, body: dict) -> dict:
    """POST one streaming completion; the timings (seconds from the send), the text and the token counts."""
    t0 = time.perf_counter()
    t_first = t_last = t_final = None
    parts: list[str] = []
    chunks, max_gap = 0, 0.0
    usage, finish = None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RequestFailed(f"HTTP {r.status_code}: {(await r.aread()).decode('utf-8', 'replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed(f"error in the stream: {str(chunk['error'])[:300]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or []:
                text = ch.get("text") or ""
                if text:
                    if t_first is None:
                        t_first = now
                    else:
                        max_gap = max(max_gap, now - t_last)
                    t_last = now
                    chunks += 1
                    parts.append(text)
                if ch.get("finish_reason"):
                    finish, t_final = ch["finish_reason"], now
    t_end = time.perf_counter()
    if finish is None:
        raise RequestFailed("the stream ended without a finish_reason")
    t_first = t_first if t_first is not None else t_final
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else chunks
    return {"ttft_s": t_first - t0, "tpot_s": (t_final - t_first) / (tokens - 1) if tokens > 1 else None,
            "e2e_s": t_end - t0, "new_tokens": tokens, "chunks": chunks, "max_gap_s": max_gap,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "finish_reason": finish,
            "usage_reported": usage is not None, "text": "".join(parts), "_t0": t0, "_t_end": t_end}


async def drive_level(base_url: str, engine: str, prompts: Sequence[BenchPrompt], concurrency: int,
                      n_requests: int, max_new_tokens: int, on_done=None) -> tuple[list[dict], float]:
    """``concurrency`` clients, each taking the next request (prompt ``i mod len(prompts)``) until
    ``n_requests`` are done; the records (in request order) and the wall time of the whole level."""
    import httpx

    url = base_url + "/v1/completions"
    todo = iter(range(n_requests))
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        t_level = time.perf_counter()

        async def worker() -> None:
            for i in todo:
                p = prompts[i % len(prompts)]
                r = await stream_request(client, url, request_body(engine, p, max_new_tokens))
                r["t_start_s"], r["t_end_s"] = r.pop("_t0") - t_level, r.pop("_t_end") - t_level
                results[i] = {"engine": engine, "concurrency": concurrency, "request": i, "prompt_id": p.id,
                              "category": p.category, "expected_prompt_tokens": len(p.token_ids), **r}
                if on_done is not None:
                    on_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t_level
    return [results[i] for i in range(n_requests)], wall


async def warm_up(base_url: str, engine: str, prompt: BenchPrompt, n: int, max_new_tokens: int) -> None:
    import httpx
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0)) as client:
        for _ in range(n):
            await stream_request(client, base_url + "/v1/completions", request_body(engine, prompt, max_new_tokens))


# ---------------------------------------------------------------- command

def parse_engines(s: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in s.split(",") if x.strip()))
    bad = [n for n in names if n not in ENGINES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, "
                                         f"got {s!r}")
    return names


def parse_concurrency(s: str) -> tuple[int, ...]:
    vals = int_list("--concurrency", lo=1)(s)
    if not vals:
        raise argparse.ArgumentTypeError(f"--concurrency needs at least one level, got {s!r}")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"--concurrency has a level twice: {s!r}")
    return tuple(sorted(vals))


def engine_unavailable(engine: str, lm) -> str | None:
    """Why ``engine`` cannot run here, or None."""
    import importlib.util
    if engine == "llamacpp":
        if lm.source.gguf is None:
            return "the model was not loaded from a GGUF"
        if importlib.util.find_spec("xllamacpp") is None:
            return "xllamacpp is not installed (pip install xllamacpp)"
    if engine == "m2r2":
        missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the server extras are missing ({', '.join(missing)}): pip install -e \".[serve]\""
    return None


def main(args: argparse.Namespace) -> int:
    import m2r2
    from tqdm.auto import tqdm

    from ..engine.threads import available_cpus
    from ..provenance import pin_threads, run_end, run_start
    from .args import build_prompts

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise M2R2Error("m2r2 bench serve needs httpx: pip install httpx") from None
    args.threads = pin_threads(args.threads or available_cpus())
    levels = args.concurrency
    n_requests = args.requests or max(2 * max(levels), 16)
    start = run_start(args.bandwidth_mb)
    lm = m2r2.load(args.model, dtype="float32")  # tokenizes only: the servers load their own copies
    prompts, warm = build_prompts(lm, args)
    ctx_max = lm.config.max_position_embeddings
    if args.ctx_per_slot > ctx_max:
        args.ctx_per_slot = ctx_max
    longest = max(len(p.token_ids) for p in [*prompts, warm])
    if longest + args.max_new_tokens > args.ctx_per_slot:
        raise M2R2Error(f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} does not fit "
                        f"--ctx-per-slot {args.ctx_per_slot}")
    skipped: dict[str, str] = {}
    engines = []
    for e in args.engines:
        why = engine_unavailable(e, lm)
        if why:
            skipped[e] = why
            print(f"m2r2 bench: skipping {e}: {why}", file=sys.stderr)
        else:
            engines.append(e)
    if not engines:
        raise M2R2Error("no engine can run here: " + "; ".join(f"{e}: {w}" for e, w in skipped.items()))
    gguf = lm.source.gguf
    logs = Path(tempfile.mkdtemp(prefix=f"m2r2-bench-{args.out}-"))
    print(f"m2r2 bench: {len(prompts)} prompts, engines {', '.join(engines)}, concurrency {levels}, "
          f"{n_requests} requests per level, {args.max_new_tokens} max tokens, {args.threads} threads; "
          f"server logs in {logs}", file=sys.stderr)

    records: list[dict] = []
    level_info: list[dict] = []
    bar = tqdm(total=len(levels) * len(engines) * n_requests, desc="serve", unit="req", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM stops the servers too
    try:
        for c in levels:
            for eng in engines:
                bar.set_description(f"{eng} c={c}")
                log = logs / f"{eng}-c{c}.log"
                srv = m2r2_server(args, c, log) if eng == "m2r2" else llamacpp_server(args, gguf, c, log)
                with srv:
                    try:
                        asyncio.run(warm_up(srv.base_url, eng, warm, args.warmup, args.max_new_tokens))
                        recs, wall = asyncio.run(drive_level(srv.base_url, eng, prompts, c, n_requests,
                                                             args.max_new_tokens, on_done=lambda: bar.update(1)))
                    except Exception as e:  # noqa: BLE001 - any failure: one line naming the server's log
                        state = "still running" if srv.alive() else "exited"
                        raise M2R2Error(f"{eng} at concurrency {c}: a request failed ({type(e).__name__}: "
                                        f"{str(e)[:300]}); the server {state}, log {log}: {_log_tail(log, 4)}") \
                            from None
                    startup = srv.startup_s
                records += recs
                level_info.append({"engine": eng, "concurrency": c, "slots": c, "wall_s": wall,
                                   "requests": n_requests, "startup_s": startup,
                                   "n_ctx": c * args.ctx_per_slot if eng == "llamacpp" else args.ctx_per_slot})
    finally:
        signal.signal(signal.SIGTERM, old_term)
        bar.close()
    run_end(args.bandwidth_mb)
    summary = summarize_serve(records, level_info)
    meta = {"model": lm.source.name, "model_identity": lm.source.identity, "gguf": gguf.name if gguf else None,
            "prompts": args.prompt_ids or args.prompts, "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "concurrency": list(levels),
            "requests_per_level": n_requests, "warmup": args.warmup, "ctx_per_slot": args.ctx_per_slot,
            "slots": "= concurrency", "endpoint": "/v1/completions (prompt as token ids, streamed)",
            "engines": engines, "skipped_engines": skipped, "levels": level_info,
            "isolation": "one server subprocess per (engine, level), never two at once", "server_logs": str(logs),
            "bandwidth_gbps": start["bandwidth_gbps"], "loadavg_start": start["loadavg"]}
    write_serve_results(args.out, meta, records, summary, args.out_dir)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .args import add_common_args

    p = subparsers.add_parser(
        "serve", help="server throughput and latency: m2r2 serve vs llama.cpp's llama-server at several concurrencies",
        description="Streams the same prompts (token ids) to m2r2's server and to llama.cpp's server, each in its "
                    "own subprocess and never both at once, with c concurrent clients and c slots per level; "
                    "writes benchmarks/results/<out>.json, .md and .png.")
    p.add_argument("--engines", type=parse_engines, default=ENGINES,
                   help=f"comma-separated (default: {','.join(ENGINES)})")
    p.add_argument("--concurrency", type=parse_concurrency, default=parse_concurrency(DEFAULT_CONCURRENCY),
                   help=f"comma-separated levels: concurrent clients = server slots (default: {DEFAULT_CONCURRENCY})")
    p.add_argument("--requests", type=int_at_least("--requests", 1), default=None,
                   help="requests per level (default: max(2 x the largest level, 16), the same at every level)")
    p.add_argument("--ctx-per-slot", type=int_at_least("--ctx-per-slot", 64), default=2048,
                   help="context per slot for both servers (llama.cpp n_ctx = slots x this; default 2048, at most "
                        "the model's window)")
    p.add_argument("--startup-timeout", type=int_at_least("--startup-timeout", 1), default=300,
                   help="seconds a server may take to answer /health (default 300)")
    add_common_args(p, out="serve", prompts="mt-bench", max_new_tokens=128)
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":
    from ..options import run_standalone

    if sys.argv[1:2] != ["serve"]:
        sys.argv.insert(1, "serve")
    run_standalone("python -m m2r2.bench.serve", "m2r2 bench serve",
                   lambda p: add_parser(p.add_subparsers(dest="bench_cmd", required=True)), lambda ns: ns.func(ns))
