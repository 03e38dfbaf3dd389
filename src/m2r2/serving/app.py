"""``m2r2 serve``: an OpenAI-compatible HTTP server on the continuous batcher (``serving/batcher.py``).

Endpoints follow OpenAI's published request and response schemas, so the official ``openai`` client, curl and
tools built for vLLM's or llama-server's endpoints work unchanged: ``POST /v1/chat/completions`` and
``POST /v1/completions`` (streaming as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text) and a chat page at ``/``. m2r2's own options ride in an
extension field, ``"m2r2": {"strategy": "m2r2", "options": {"gamma": 3}}``, checked against the strategy
registry. Every bad request is a 4xx with OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}``; nothing a client sends stops the server.

Built on Starlette/FastAPI and uvicorn (ASGI, streaming responses, disconnect detection) and
``prometheus-client`` (the metrics text format): well-kept libraries made for this, rather than hand-written
HTTP.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from importlib import resources
from html import escape as html_escape

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.sampling import SamplingConfig
from ..errors import ContextLengthError, M2R2Error, StrategyError
from .batcher import Batcher, Event, QueueFull, Request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request fields

def _field(body: dict, name: str, kinds: tuple, default=None, *, check=None, why: str = ""):
    """Field ``name`` of the request, of one of ``kinds`` (None allowed: the default), checked by ``check``."""
    if name not in body or body[name] is None:
        return default
    v = body[name]
    if bool not in kinds and isinstance(v, bool) or not isinstance(v, kinds):
        names = " or ".join("number" if k is float else "integer" if k is int else "boolean" if k is bool else
                            "string" if k is str else "array" if k is list else "object" for k in kinds)
        raise APIError(400, f"'{name}' must be a {names}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be finite", param=name, code="invalid_value")
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' {why}, got {json.dumps(v)[:60]}", param=name, code="invalid_value")
    return v


def _common(body: dict, default_strategy: str) -> dict:
    """The sampling, budget, stop and m2r2 fields chat and completions share."""
    mt = _field(body, "max_completion_tokens", (int,), None, check=lambda v: v >= 1, why="must be >= 1")
    if mt is None:
        mt = _field(body, "max_tokens", (int,), 128, check=lambda v: v >= 1, why="must be >= 1")
    temperature = _field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2, why="must be in [0, 2]")
    top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, why="must be in (0, 1]")
    seed = _field(body, "seed", (int,), None, check=lambda v: v >= 0, why="must be >= 0")
    n = _field(body, "n", (int,), 1, check=lambda v: v >= 1, why="must be >= 1")
    if n != 1:
        raise APIError(400, "only n=1 is supported (send n requests)", param="n", code="unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise APIError(400, "'stop' must be a string or an array of up to 4 strings", param="stop", code="invalid_type")
    if _field(body, "logprobs", (bool, int), False) not in (False, None, 0):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_value")
    ext = _field(body, "m2r2", (dict,), {})
    strategy = ext.get("strategy", default_strategy)
    options = ext.get("options", {})
    if not isinstance(strategy, str):
        raise APIError(400, "'m2r2.strategy' must be a string", param="m2r2.strategy", code="invalid_type")
    if not isinstance(options, dict):
        raise APIError(400, "'m2r2.options' must be an object", param="m2r2.options", code="invalid_type")
    unknown = sorted(set(ext) - {"strategy", "options"})
    if unknown:
        raise APIError(400, f"unknown m2r2 field(s) {unknown} (known: strategy, options)", param="m2r2",
                       code="invalid_value")
    stream = _field(body, "stream", (bool,), False)
    so = _field(body, "stream_options", (dict,), {}) or {}
    return {"max_tokens": mt, "sampling": SamplingConfig(temperature=float(temperature), top_p=float(top_p), seed=seed),
            "stop": tuple(s for s in stop if s), "strategy": strategy, "options": options, "stream": stream,
            "include_usage": bool(so.get("include_usage", False))}


def chat_prompt(lm, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_type")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}].role",
                           code="invalid_value")
        c = m.get("content")
        if isinstance(c, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="unsupported_value")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                           code="invalid_type")
        msgs.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
    if not lm.has_chat_template:
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages",
                       code="unsupported_value")
    return lm.encode_messages(msgs)


def completion_prompt(lm, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        if lm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt", code="invalid_value")
        return lm.encode(prompt, chat=False)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a string, an array of token ids, or an array of one of those",
                   param="prompt", code="invalid_type")


# ---------------------------------------------------------------- the app

def create_app(lm, batcher: Batcher, *, model_name: str, api_key: str | None = None, default_strategy: str = "plain"):
    from .metrics import Metrics

    app = FastAPI(title="m2r2", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(batcher)
    created = int(time.time())

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.request(request.url.path, e.status)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(APIError(400, str(e)[:300]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return error_response(APIError(e.status_code, str(e.detail), type_="not_found_error" if e.status_code == 404
                                       else "invalid_request_error"))

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path not in ("/", "/health"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                               type_="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    async def read_json(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def submit(ids: list[int], c: dict, prompt_param: str, loop, queue: asyncio.Queue):
        req = Request(ids, c["max_tokens"], c["sampling"], c["stop"], c["strategy"], c["options"])

        def on_event(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        try:
            return batcher.submit(req, on_event)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ContextLengthError as e:
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        except StrategyError as e:
            raise APIError(400, str(e), param="m2r2", code="invalid_value") from None
        except M2R2Error as e:
            raise APIError(400, str(e), code="invalid_value") from None

    async def run(request: HTTPRequest, kind: str):
        body = await read_json(request)
        c = _common(body, default_strategy)
        if kind == "chat":
            ids = chat_prompt(lm, body.get("messages"))
        else:
            if body.get("echo"):
                raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
            ids = completion_prompt(lm, body.get("prompt"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = submit(ids, c, "messages" if kind == "chat" else "prompt", loop, queue)
        metrics.started(handle)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{handle.id}"
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage(ev: Event) -> dict:
            return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                    "total_tokens": ev.prompt_tokens + ev.completion_tokens}

        def finish_of(ev: Event) -> str:
            if ev.finish_reason and ev.finish_reason.startswith("error:"):
                return "error"
            return ev.finish_reason

        if not c["stream"]:
            text, last = [], None
            try:
                while True:
                    ev = await queue.get()
                    text.append(ev.text)
                    if ev.finish_reason:
                        last = ev
                        break
            except asyncio.CancelledError:
                handle.cancel()
                raise
            metrics.finished(handle, last, 200, request.url.path)
            if last.finish_reason.startswith("error:"):
                raise APIError(400, last.finish_reason[6:], param="m2r2", code="invalid_value")
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                       "finish_reason": finish_of(last)} if kind == "chat"
                      else {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_of(last)})
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "system_fingerprint": "m2r2", "choices": [choice], "usage": usage(last)})

        async def events():
            first = True
            last = None
            try:
                while True:
                    try:
                        ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            handle.cancel()
                            return
                        continue
                    done = ev.finish_reason is not None
                    if ev.text or done or first:
                        if kind == "chat":
                            delta = ({"role": "assistant", "content": ev.text} if first else {"content": ev.text})
                            if done and not ev.text and not first:
                                delta = {}
                            choice = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish_of(ev) if done else None}
                            chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                     "model": model_name, "system_fingerprint": "m2r2", "choices": [choice]}
                        else:
                            chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                                     "model": model_name, "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                                                       "finish_reason": finish_of(ev) if done else None}]}
                        if done and c["include_usage"]:
                            chunk["usage"] = None
                        first = False
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if done:
                        last = ev
                        if c["include_usage"]:
                            tail = {"id": rid, "object": chunk["object"], "created": int(time.time()),
                                    "model": model_name, "choices": [], "usage": usage(ev)}
                            yield f"data: {json.dumps(tail)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if last is None:
                    handle.cancel()
                metrics.finished(handle, last, 200 if last is not None else 499, request.url.path)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run(request, "completion")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "m2r2"}]}

    @app.get("/health")
    async def health():
        if batcher.error is not None:
            return JSONResponse({"status": "error", "error": str(batcher.error)}, status_code=500)
        return {"status": "ok", "slots_idle": batcher.parallel - batcher.active(),
                "slots_processing": batcher.active(), "queue": batcher.queued()}

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/")
    async def page():
        html = resources.files("m2r2.serving").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", html_escape(model_name)))

    return app


def serve(lm, *, host: str = "127.0.0.1", port: int = 8000, parallel: int = 4, strategy: str = "plain",
          api_key: str | None = None, ctx_size: int | None = None, max_queue: int = 64, model_name: str | None = None,
          log_level: str = "warning") -> None:
    """Run the server until interrupted (Ctrl-C): HTTP in a thread, the engine loop in this (the main) thread,
    where the process's one OpenMP pool runs at full speed (see ``Batcher.start``)."""
    import sys
    import threading

    import uvicorn
    batcher = Batcher(lm, parallel=parallel, max_queue=max_queue, ctx_size=ctx_size)
    batcher.validate(Request([0], 1, strategy=strategy))  # the default strategy: known and lossless
    app = create_app(lm, batcher, model_name=model_name or lm.source.name, api_key=api_key,
                     default_strategy=strategy)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    http = threading.Thread(target=server.run, name="m2r2-http", daemon=True)
    http.start()
    deadline = time.time() + 30
    while not server.started and http.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        from ..errors import M2R2Error
        raise M2R2Error(f"could not serve on {host}:{port} (address in use, or not allowed?)")
    print(f"m2r2: serving {lm.source.name} on http://{host}:{port} ({parallel} slots, strategy {strategy}; "
          "OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics; chat page at /)",
          file=sys.stderr, flush=True)
    stopper = threading.Thread(target=lambda: (http.join(), batcher.stop()), daemon=True)
    stopper.start()  # the HTTP side stopping (e.g. SIGTERM handled by uvicorn) stops the engine loop too
    try:
        batcher.run()
    finally:
        server.should_exit = True
        http.join(timeout=10)
