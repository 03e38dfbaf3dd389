"""``m2r2 bench serve``: the servers under test, each in a subprocess of its own (m2r2's ``serve``, llama.cpp's
llama-server through xllamacpp), and the asyncio + httpx streaming client that drives a concurrency level."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import M2R2Error
from .arms import BenchPrompt

ENGINES = ("m2r2", "llamacpp")
DEFAULT_CONCURRENCY = "1,4,8,16"
REFERENCE_ENGINE = "m2r2"



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
    if getattr(args, "m2r2_weights", "fp32") != "fp32":
        cmd += ["--weights", args.m2r2_weights]
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
