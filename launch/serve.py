"""`multitune serve`: one ChatModel behind an OpenAI-compatible chat-completions HTTP API (FastAPI on uvicorn).

Why FastAPI + uvicorn: HTTP parsing, keep-alive, chunked bodies and server-sent events are done by a maintained,
widely deployed stack (uvicorn/h11 parse, Starlette streams, pydantic validates), the same one vLLM's and most
OpenAI-compatible servers use; the event loop stays free while the model generates on its own thread, so `/health`
and new requests are answered during a generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from multitune.launch.chat_model import ChatModel, Completion, RequestError, Sampling

UNAUTHENTICATED = ("/health",)  # load balancers and orchestrators probe it without credentials


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server: `max_tokens` new tokens at most (the default a request gets is
    `default_max_tokens`, capped at that), a body of `max_body_bytes`, `timeout_s` seconds from arrival to the
    last token (queueing included), and at most `max_queue` requests waiting behind the one generating."""

    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 600.0
    max_queue: int = 64


# ---- the request, validated once at the edge -------------------------------------------------------------------

class ContentPart(BaseModel):
    type: StrictStr
    text: StrictStr = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[ContentPart]

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" for part in self.content):  # an image answered without it would mislead
            raise RequestError(f"messages[{index}].content: only text parts are supported",
                               param=f"messages[{index}].content")
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """A chat-completions request; OpenAI fields this server does not use (user, frequency_penalty, ...) are
    ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


def parse_request(body: bytes, served_name: str, limits: ServeLimits) -> tuple[list[dict], Sampling, ChatRequest]:
    """Messages and sampling from a chat-completions body; RequestError names the bad field (`param`)."""
    try:
        request = ChatRequest.model_validate_json(body or b"null")
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "json_invalid":
            raise RequestError(f"request body is not valid JSON ({error['msg']})") from None
        if not error["loc"]:
            raise RequestError("request body must be a JSON object") from None
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        raise RequestError(f"{param}: {error['msg']}", param=param) from None
    if request.model is not None and request.model != served_name:
        raise RequestError(f"model '{request.model}' is not served here (this server serves '{served_name}')",
                           param="model", status=404, kind="model_not_found")
    if request.n != 1:
        raise RequestError("only n=1 is supported", param="n")
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise RequestError(f"max_tokens ({asked}) is above this server's limit of {limits.max_tokens} (--max-tokens)",
                           param="max_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if not all(stop):
        raise RequestError("stop: an empty string would stop before the first character", param="stop")
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(request.messages)]
    sampling = Sampling(asked or min(limits.default_max_tokens, limits.max_tokens), request.temperature,
                        request.top_p, tuple(stop), request.seed)
    return messages, sampling, request


# ---- generation, one at a time, first come first served ---------------------------------------------------------

class Job:
    """One request's generation: its events (("text", str) when streamed, then ("done", Completion) or ("error",
    Exception)) arrive on an asyncio queue of the server's loop; setting `cancel` ends it at the next token, or
    before it starts."""

    def __init__(self, request_id: str, prompt: list[int], sampling: Sampling, stream: bool, arrived: float,
                 deadline: float, loop: asyncio.AbstractEventLoop):
        self.id, self.prompt, self.sampling, self.stream = request_id, prompt, sampling, stream
        self.arrived, self.deadline, self.loop = arrived, deadline, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.started = None  # time.monotonic() when its generation began

    def push(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.cancel.set()


class GenerationQueue:
    """A worker thread that runs jobs one at a time in arrival order (FIFO: no request is overtaken), so one model
    serves many clients fairly; `submit` refuses with 429 when `max_queue` jobs already wait."""

    def __init__(self, chat: ChatModel, max_queue: int):
        self.chat, self.max_queue = chat, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        if self.jobs.qsize() >= self.max_queue:
            raise RequestError(f"server busy: {self.max_queue} requests are already waiting; retry later",
                               status=429, kind="rate_limit_error")
        self.jobs.put(job)
        return job

    def close(self) -> None:
        while True:  # end what waits, then the worker
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
        self.jobs.put(None)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job.started = time.monotonic()
            try:
                on_text = (lambda text: job.push("text", text)) if job.stream else None
                completion = self.chat.generate(job.prompt, job.sampling, on_text, job.cancel, job.deadline)
            except Exception as exc:  # a failed generation answers its client; the worker serves the next one
                _log(job, f"failed: {type(exc).__name__}: {exc}")
                job.push("error", exc)
            else:
                _log(job, f"completion={completion.completion_tokens} finish={completion.finish_reason}")
                job.push("done", completion)


def _log(job: Job, outcome: str) -> None:
    """One line per generation on stderr: the request id, tokens, why it ended, time queued and generating."""
    now = time.monotonic()
    print(f"{job.id} prompt={len(job.prompt)} {outcome} queued={job.started - job.arrived:.2f}s "
          f"generated={now - job.started:.2f}s", file=sys.stderr, flush=True)


# ---- HTTP -------------------------------------------------------------------------------------------------------

def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(f"request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                         status=413)


class Gate:
    """ASGI middleware in front of every route: the API key (`Authorization: Bearer KEY`, compared in constant
    time; /health is open) and the body-size limit, checked on `Content-Length` before a byte of the body is read,
    and counted while a chunked body arrives. Logs one line per request on stderr (never a header)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        # digests of equal length: compare_digest's time then depends on neither the key's value nor its length
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.monotonic(), [None]
        headers = dict(scope["headers"])

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal is not None:
                await _send_json(logged_send, *refusal)
                return
            received = 0

            async def counted_receive():  # a chunked body has no Content-Length: count it as it comes
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)  # answered 413 by the app's RequestError handler
                return message

            await self.app(scope, counted_receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            print(f'{client[0]}:{client[1]} "{scope["method"]} {scope["path"]}" {status[0]} '
                  f"{time.monotonic() - began:.2f}s", file=sys.stderr, flush=True)

    def _refusal(self, path: str, headers: dict) -> tuple[int, dict, dict] | None:
        if self.key_digest is not None and path not in UNAUTHENTICATED:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return 401, error_body("missing API key: send the header 'Authorization: Bearer KEY'",
                                       "invalid_request_error", code="invalid_api_key"), {"WWW-Authenticate": "Bearer"}
            if not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.key_digest):
                return 401, error_body("incorrect API key provided", "invalid_request_error",
                                       code="invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        length = headers.get(b"content-length", b"")  # uvicorn has already refused a malformed one
        if length.isdigit() and int(length) > self.max_body_bytes:
            too_large = BodyTooLarge(self.max_body_bytes)
            return too_large.status, error_body(str(too_large), too_large.kind), {"Connection": "close"}
        return None


async def _send_json(send, status: int, payload: dict, headers: dict) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def completion_response(completion: Completion, name: str, request_id: str, created: int) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": usage(completion)}


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _timed_out(limits: ServeLimits) -> RequestError:
    return RequestError(f"the request took longer than this server's limit of {limits.timeout_s:g} s (--timeout)",
                        status=504, kind="timeout")


def create_app(chat: ChatModel, limits: ServeLimits, api_key: str | None = None, on_ready=None):
    """The ASGI app: FastAPI routes behind the Gate (API key, body limit, request log). `on_ready()` runs once
    the app has started."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["queue"] = GenerationQueue(chat, limits.max_queue)
        if on_ready is not None:
            on_ready()
        yield
        state["queue"].close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return JSONResponse(error_body(str(exc), exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}",
                                       "not_found" if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # a failed generation answers the client; the server goes on
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": chat.name, "object": "model", "created": 0, "owned_by": "multitune"}]}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        arrived, request_id, created = time.monotonic(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        messages, sampling, parsed = parse_request(await request.body(), chat.name, limits)
        prompt = await run_in_threadpool(chat.prompt_ids, messages, sampling.max_tokens)
        job = state["queue"].submit(Job(request_id, prompt, sampling, parsed.stream, arrived,
                                        arrived + limits.timeout_s, asyncio.get_running_loop()))
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_events(job, request_id, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            kind, value = await job.events.get()
        finally:
            watcher.cancel()
            job.cancel.set()
        if kind == "error":
            raise value
        if value.finish_reason == "timeout":
            raise _timed_out(limits)
        if value.finish_reason == "cancelled":  # the client has gone: this answer reaches nobody (logged as 499)
            return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
        return completion_response(value, chat.name, request_id, created)

    async def _cancel_on_disconnect(request: Request, job: Job) -> None:
        """Ends a non-streaming request's generation as soon as its client goes away (its body is read, so the
        next ASGI message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    async def _events(job: Job, request_id: str, created: int, include_usage: bool):
        """Server-sent events in OpenAI's chunk format: the role, the text piece by piece, the finish_reason, the
        usage when asked (`stream_options.include_usage`), then `[DONE]`. When the client goes away Starlette
        cancels this generator, and `finally` ends the generation."""
        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                          "model": chat.name, "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

        def delta(content: dict, finish_reason: str | None = None) -> str:
            return chunk([{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}])

        try:
            yield delta({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield delta({"content": value})
                    continue
                if kind == "error":
                    yield "data: " + json.dumps(error_body(f"{type(value).__name__}: {value}", "server_error")) + "\n\n"
                elif value.finish_reason == "timeout":
                    exc = _timed_out(limits)
                    yield "data: " + json.dumps(error_body(str(exc), exc.kind)) + "\n\n"
                else:
                    yield delta({}, value.finish_reason)
                    if include_usage:
                        yield chunk([], usage=usage(value))
                    yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel.set()

    return Gate(app, api_key, limits.max_body_bytes)


def open_host_warning(host: str, api_key: str | None) -> str | None:
    """The one-line warning for a server reachable from other machines that needs no key (None when keyed or
    bound to loopback only)."""
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
            "(set one with --api-key-env VAR)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one). OSError when the address is taken or unknown."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(chat: ChatModel, host: str, port: int, limits: ServeLimits = ServeLimits(),
          api_key: str | None = None) -> None:
    """Serve until interrupted; prints the bound address (port 0 picks a free one) once requests are accepted."""
    import uvicorn

    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host

    def ready():
        print(f"serving {chat.name} on http://{shown}:{sock.getsockname()[1]}/v1", flush=True)
        if chat.system_prompt:
            print(f"requests without a system message get the adapter's trained one ({len(chat.system_prompt)} "
                  "characters, from multitune.json)", flush=True)

    app = create_app(chat, limits, api_key, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
