"""
An OpenAI-compatible HTTP API for a checkpoint, on FastAPI + uvicorn, built on text_generator's engine.

    python serve.py --checkpoint=out                                  # http://127.0.0.1:8000/v1
    MODERN_LLM_API_KEY=secret python serve.py --checkpoint=out        # clients send "Authorization: Bearer secret"

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint tokenizer's chat
template), GET /health. Any OpenAI client works: point its base_url at http://127.0.0.1:8000/v1.
GET / is a chat page (chat.html, beside this file) that talks to those routes; GET /info tells it the model.

How concurrent requests are served (continuous batching): one worker thread owns the engine's batch. Before
each decode step, waiting requests join the running batch as far as MAX_BATCH_SIZE rows allow (a row is one
prompt x one of `n` choices); a row that ends, or whose client disconnects, leaves at once, and its request is
answered as soon as its own rows are done. A full queue answers 503 instead of growing.

No caller can hold up the others (serve_requests.py): Host, Origin and Content-Type are checked first, then the
body's size and arrival time, then the strict request models and sizes, and only then is anything tokenized,
in a worker thread; uvicorn limits connections, header sizes and the time headers may take.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from checkpoint import trained_on_chats
from cli import UserError, parse_flags, run_main, settings_block, utf8_text
from engine import Engine, chat_prompt_ids
from sampling import SamplingParams
from serve_requests import (APIError, CallerGuard, ChatRequest, CompletionRequest, SamplingRequest, check_sizes,
                            decode_json, error_body, parse_request, read_body)

CHECKPOINT = "out"  # checkpoint directory: a run's OUT_DIR or any Llama checkpoint directory
HOST = "127.0.0.1"  # address to listen on; 0.0.0.0 exposes the server to the network (set an API key then)
PORT = 8000  # TCP port to listen on (0 picks a free one)
API_KEY = ""  # if set, every route but /health needs "Authorization: Bearer KEY" (shows in `ps`: prefer the next two)
API_KEY_FILE = ""  # read the API key from this file instead (or from the environment variable MODERN_LLM_API_KEY)
MODEL_NAME = ""  # model id in responses and /v1/models (default: the checkpoint directory's name)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
DTYPE = "auto"  # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
QUANTIZE = ""  # "int8": weight-only int8 (faster decoding, a quarter of the weight bytes); empty for none
COMPILE = False  # torch.compile the decode step (slow start, faster tokens)
MAX_BATCH_SIZE = 16  # most rows (prompts x n) decoded together; also the most one request may ask for
MAX_QUEUE = 64  # most requests waiting for a place in the batch; one more answers 503
SCHEDULER = "continuous"  # continuous: requests join the running batch; static: they wait for it to end (the old way)
BATCH_WINDOW_MS = 20  # static scheduler: how long the first request of a batch waits for others to join it
MAX_REQUEST_BYTES = 1_000_000  # a larger request body answers 413
MAX_HEADER_BYTES = 16_384  # larger request headers answer 431
HEADER_TIMEOUT_S = 10.0  # a connection that has not sent its request headers within this is closed
BODY_TIMEOUT_S = 30.0  # a request body that has not fully arrived within this answers 408
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds
MAX_CONNECTIONS = 256  # open connections at most; beyond it requests answer 503
ALLOWED_HOSTS: list = []  # Host header names accepted besides the listening address (repeatable; "*": any)
ALLOWED_ORIGINS: list = []  # web origins (https://app.example) whose pages may call the API (repeatable; "*": any)
BENCHMARK = False  # instead of serving: the serving benchmark (old and new scheduler) on this checkpoint
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

API_KEY_ENV = "MODERN_LLM_API_KEY"  # the environment variable an API key may come from


# -----------------------------------------------------------------------------
# The scheduler: a queue of jobs in front of one worker thread that owns the engine's batch

DONE = object()  # the worker's last message to a job


@dataclass(eq=False)  # hashable by identity
class Job:
    """One request: its rows (prompt token ids, sampling parameters) and the queue its events arrive on."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    unfinished: int = 0  # rows still decoding

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, item) -> None:
        """Called from the worker thread: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Scheduler:
    """continuous: before each decode step, waiting requests join the running batch as far as its free rows
    allow, first come first served (a request never overtakes an earlier one); a row that ends frees its place
    at once. static, the behaviour before continuous batching (kept to compare against): the first request of a
    batch waits window_s for others, and the batch runs until its last row ends while later requests wait."""

    def __init__(self, engine, max_batch_size: int, max_queue: int, window_s: float, continuous: bool = True):
        self.engine, self.max_batch_size, self.max_queue, self.window_s = engine, max_batch_size, max_queue, window_s
        self.continuous = continuous
        self.waiting: deque[Job] = deque()
        self.running_rows = 0
        self.cond = threading.Condition()
        threading.Thread(target=self.work, name="engine", daemon=True).start()

    def refuse_if_full(self) -> None:
        if len(self.waiting) >= self.max_queue:
            raise APIError(503, f"server busy: {len(self.waiting)} requests already queued; retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
        """Queue a request (call from the event loop); 503 when the queue is full."""
        job = Job(prompts, params, asyncio.get_running_loop(), asyncio.Queue(), unfinished=len(prompts))
        with self.cond:
            self.refuse_if_full()
            self.waiting.append(job)
            self.cond.notify()
        return job

    def admit(self, batch, running: set[Job]) -> None:
        """Move the waiting jobs that fit into the batch (static: after the batch window)."""
        with self.cond:
            if not self.continuous:
                deadline = time.monotonic() + self.window_s
                while sum(len(j.prompts) for j in self.waiting) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            while self.waiting and (self.waiting[0].cancelled or len(self.waiting[0].prompts) <= batch.free()):
                job = self.waiting.popleft()
                if not job.cancelled:  # its client left while it waited
                    running.add(job)
                    for i, (prompt, params) in enumerate(zip(job.prompts, job.params)):
                        batch.add(prompt, params, key=(job, i))
            self.running_rows = len(batch)

    def work(self) -> None:
        """While there are rows, one batch (and its KV cache) is open; an idle server holds neither."""
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
            running: set[Job] = set()
            with self.engine.batch(self.max_batch_size) as batch:
                try:
                    self.admit(batch, running)
                    while len(batch):
                        self.step(batch, running)
                        if self.continuous:
                            self.admit(batch, running)
                except Exception as e:  # a failed step must not kill the worker: its requests get the error
                    traceback.print_exc()
                    for job in running:
                        job.deliver(e)
            self.running_rows = 0

    def step(self, batch, running: set[Job]) -> None:
        events: dict[Job, list] = {}
        for (job, i), event in batch.step(cancelled=lambda key: key[0].cancelled):
            events.setdefault(job, []).append((i, event))
            job.unfinished -= event.finish_reason is not None
        for job, items in events.items():
            job.deliver(items)
            if not job.unfinished:  # answer now, not when the batch's longest row ends
                job.deliver(DONE)
                running.discard(job)
        self.running_rows = len(batch)


async def job_events(job: Job) -> AsyncIterator[list]:
    """The (row, TokenEvent) lists of each decode step, until the job ends."""
    while (item := await job.events.get()) is not DONE:
        if isinstance(item, UserError):
            raise APIError(400, item.args[0])
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {type(item).__name__}: {item}", type="server_error")
        yield item


# -----------------------------------------------------------------------------
# From a request to engine rows


def prompt_token_ids(engine, req: SamplingRequest) -> list[list[int]]:
    """Each prompt of the request as token ids: chat messages through the checkpoint's chat template."""
    tok = engine.tokenizer
    if isinstance(req, ChatRequest):
        if not tok.chat_template:
            raise APIError(400, "this checkpoint's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return [chat_prompt_ids(tok, messages)]  # message text stays text: no injected control tokens
        except TemplateError as e:  # templates may refuse a conversation, e.g. roles that do not alternate
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        except UserError as e:
            raise APIError(400, e.args[0], param="messages") from None
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
    if isinstance(prompts[0], int):  # one prompt given as token ids
        prompts = [prompts]
    vocab = engine.model.cfg.vocab_size
    ids = [encode(tok, p) if isinstance(p, str) else p for p in prompts]
    for p in ids:
        if any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return ids


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def engine_rows(engine, req: SamplingRequest,
                prompts: list[list[int]]) -> tuple[list[list[int]], list[SamplingParams]]:
    """n rows per prompt (choice index = prompt * n + j), each with its SamplingParams, checked against the
    context: OpenAI refuses a request whose prompt plus max_tokens exceeds it, rather than cutting it short."""
    context, vocab = engine.max_seq_len, engine.model.cfg.vocab_size
    asked = req.max_completion_tokens or req.max_tokens
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    row_prompts, row_params = [], []
    for p in prompts:
        if not p:
            raise APIError(400, "the prompt is empty", param=param)
        if len(p) + (asked or 1) > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has {len(p)} "
                           f"and the completion asks for {asked or 1} more", param=param,
                           code="context_length_exceeded")
        new = asked or context - len(p)
        for j in range(req.n):
            params = SamplingParams(
                max_new_tokens=new, temperature=req.temperature, top_k=min(req.top_k, vocab), top_p=req.top_p,
                min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, stop=stop,
                seed=None if req.seed is None else req.seed + j)  # choice j of seed s = choice 0 of seed s + j
            try:
                params.validate()
            except UserError as e:
                raise APIError(400, e.args[0]) from None
            row_prompts.append(p)
            row_params.append(params)
    return row_prompts, row_params


def request_rows(engine, kind: type[SamplingRequest], body: bytes, max_rows: int, max_chars: int):
    """From the body's bytes to the request and its engine rows, cheapest check first. Runs in a worker thread:
    decoding, validating, templating and tokenizing a large request never holds up the event loop."""
    req = parse_request(kind, decode_json(body), most_items=max(max_rows, engine.max_seq_len))
    check_sizes(req, max_rows, max_chars)
    prompts = prompt_token_ids(engine, req)
    return req, prompts, *engine_rows(engine, req, prompts)


# -----------------------------------------------------------------------------
# Responses, in the OpenAI API's JSON shapes


@dataclass
class Reply:
    """What one response is about: its id, kind (chat or completion) and model name."""

    chat: bool
    model: str
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def choice(self, index: int, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
        """A choice of a full response, or (delta) of a stream chunk; a chat stream's first chunk of a choice
        carries the role, its finishing chunk an empty delta."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if not delta:
            message = {"role": "assistant", "content": text}
        else:
            message = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"index": index, ("delta" if delta else "message"): message, "logprobs": None, "finish_reason": finish}

    def body(self, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            out["usage"] = usage
        return out


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(map(len, prompts))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def full_response(job: Job, reply: Reply, prompts: list[list[int]], rows: int, request) -> dict:
    """Collect every row's text; if the client hangs up meanwhile, cancel the job so its rows stop."""
    texts, finish, tokens = [""] * rows, [None] * rows, 0
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        async for step in job_events(job):
            for i, ev in step:
                texts[i] += ev.text_delta
                tokens += ev.token_id is not None
                finish[i] = ev.finish_reason or finish[i]
    finally:
        watcher.cancel()
    choices = [reply.choice(i, texts[i], finish[i], delta=False) for i in range(rows)]
    return reply.body(choices, usage(prompts, tokens))


async def cancel_on_disconnect(request, job: Job) -> None:
    """The body has been read, so the next ASGI message is the client's disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def stream_response(job: Job, reply: Reply, prompts: list[list[int]], rows: int,
                          include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: a chunk per decode step, then `data: [DONE]`. Starlette cancels this generator when
    the client disconnects; `finally` then cancels the job, which frees its rows at the next decode step."""
    started, tokens = [False] * rows, 0
    try:
        async for step in job_events(job):
            choices = []
            for i, ev in step:
                tokens += ev.token_id is not None
                if ev.text_delta or ev.finish_reason or not started[i]:
                    choices.append(reply.choice(i, ev.text_delta, ev.finish_reason, delta=True, first=not started[i]))
                    started[i] = True
            if choices:
                yield sse(reply.body(choices, None, chunk=True))
        if include_usage:
            yield sse(reply.body([], usage(prompts, tokens), chunk=True))
    except APIError as e:  # the status line has been sent: report the error in the stream, as OpenAI does
        yield sse(error_body(e.message, e.type, e.param, e.code))
    finally:
        job.cancel()
    yield sse("[DONE]")


# -----------------------------------------------------------------------------
# The chat page: one file, no build step, nothing fetched from elsewhere

PAGE_FILE = Path(__file__).with_name("chat.html")


def chat_page() -> tuple[str, dict]:
    """chat.html and its headers. The Content-Security-Policy lets only the page's own inline script and style run
    (named by their hashes) and lets it talk to this server alone: whatever a model writes, the browser will not
    run it, load it or send it elsewhere."""
    page = PAGE_FILE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


# -----------------------------------------------------------------------------
# The app

def create_app(engine, model_name: str, api_key: str = "", max_batch_size: int = MAX_BATCH_SIZE,
               max_queue: int = MAX_QUEUE, batch_window_ms: float = BATCH_WINDOW_MS,
               max_request_bytes: int = MAX_REQUEST_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               scheduler: str = SCHEDULER, host: str = HOST, allowed_hosts: list[str] = ALLOWED_HOSTS,
               allowed_origins: list[str] = ALLOWED_ORIGINS):
    app = FastAPI(title="modern-llm", docs_url=None, redoc_url=None, openapi_url=None)
    queue = app.state.scheduler = Scheduler(engine, max_batch_size, max_queue, batch_window_ms / 1000,
                                            continuous=scheduler == "continuous")
    # No prompt of more characters fits the context, whatever it encodes to: refused without tokenizing it.
    max_chars = engine.max_seq_len * max(map(len, engine.tokenizer.get_vocab()))
    if allowed_origins:  # answers browsers' preflight requests; other origins are refused by CallerGuard
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(CallerGuard, bound_host=host, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)  # unknown route, wrong method
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # Starlette re-raises it afterwards, so uvicorn logs it
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": len(queue.waiting), "running_rows": queue.running_rows}

    page, page_headers = chat_page()

    @app.get("/")
    async def chat():  # the page holds no secret: the key, if any, is asked for by the page and sent by it
        return HTMLResponse(page, headers=page_headers)

    @app.get("/info", dependencies=[Depends(check_key)])
    async def info():
        """What the chat page shows and which mode it starts in (chat only for a model trained on chats)."""
        return {"model": model_name, "context_length": engine.max_seq_len,
                "chat_template": bool(engine.tokenizer.chat_template),
                "trained_on_chats": trained_on_chats(engine.path)}

    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "modern-llm"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} not found; this server serves {model_name!r}", param="model",
                           code="model_not_found")
        return model_card

    async def complete(request: Request, kind: type[SamplingRequest]):
        queue.refuse_if_full()  # before reading anything
        body = await read_body(request, max_request_bytes, body_timeout_s)
        req, prompts, row_prompts, row_params = await run_in_threadpool(request_rows, engine, kind, body,
                                                                        max_batch_size, max_chars)
        job = queue.submit(row_prompts, row_params)
        reply = Reply(chat=kind is ChatRequest, model=model_name)
        if not req.stream:
            return await full_response(job, reply, prompts, len(row_prompts), request)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # The background task also cancels a job whose client left before the stream began.
        return StreamingResponse(stream_response(job, reply, prompts, len(row_prompts), include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(job.cancel))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        return await complete(request, CompletionRequest)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        return await complete(request, ChatRequest)

    return app


# -----------------------------------------------------------------------------
# The HTTP server: uvicorn, with limits on connections, header sizes and the time headers and bodies take


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline and a size limit for each request's headers: uvicorn closes idle
    keep-alive connections, but would wait forever for headers that trickle in a byte at a time (slow loris),
    and h11 bounds only headers that arrive in pieces."""

    def __init__(self, *args, header_timeout_s: float, max_header_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.max_header_bytes = header_timeout_s, max_header_bytes
        self.header_deadline: asyncio.TimerHandle | None = None
        self.head = bytearray()  # what has arrived of the next request's headers

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.await_headers()

    def data_received(self, data: bytes) -> None:
        if not self.in_request():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end > self.max_header_bytes or (end < 0 and len(self.head) > self.max_header_bytes):
                message = f"request headers over {self.max_header_bytes} bytes".encode()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
                                     b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                     % (len(message), message))
                self.transport.close()
                return
        super().data_received(data)
        if self.in_request():  # the headers are in; the body has its own timeout
            self.head.clear()
            if self.header_deadline:
                self.header_deadline.cancel()

    def connection_lost(self, exc) -> None:
        if self.header_deadline:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def await_headers(self) -> None:
        if self.header_deadline:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout_s, self.headers_late)

    def headers_late(self) -> None:
        if not self.in_request() and not self.transport.is_closing():
            self.transport.close()


def server_config(app, log_level: str = "warning", max_connections: int = MAX_CONNECTIONS,
                  header_timeout_s: float = HEADER_TIMEOUT_S, keep_alive_s: int = KEEP_ALIVE_S,
                  max_header_bytes: int = MAX_HEADER_BYTES) -> uvicorn.Config:
    protocol = functools.partial(TimedH11Protocol, header_timeout_s=header_timeout_s,
                                 max_header_bytes=max_header_bytes)
    return uvicorn.Config(app, http=protocol, log_level=log_level, limit_concurrency=max_connections,
                          timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=max_header_bytes,
                          timeout_graceful_shutdown=2)


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second with a clear message."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}", "Server")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on host {host!r}: {e.strerror}", "Server") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; another server may be using the port: "
                        f"stop it or pass --port={port + 1 if port else 8001}", "Server port is in use") from None
    sock.listen(2048)
    return sock


def start_in_thread(app, sock: socket.socket, **limits) -> tuple[uvicorn.Server, str]:
    """Run the app in a background thread (benchmark, tests); returns the server and its base URL."""
    server = uvicorn.Server(server_config(app, **limits))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, base_url(sock)


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


# -----------------------------------------------------------------------------
# Flags, checked before anything is loaded


def check_flags(cfg: dict) -> None:
    at_least = {"max_batch_size": 1, "max_queue": 1, "max_request_bytes": 1, "max_header_bytes": 1024,
                "keep_alive_s": 1, "batch_window_ms": 0}
    for name, least in at_least.items():
        if cfg[name] < least:
            raise UserError(f"--{name} must be at least {least}, got {cfg[name]}", "Server")
    for name in ("header_timeout_s", "body_timeout_s"):
        if not cfg[name] > 0:
            raise UserError(f"--{name} must be more than 0 seconds, got {cfg[name]}", "Server")
    if cfg["max_connections"] <= cfg["max_queue"] + cfg["max_batch_size"]:
        raise UserError(f"--max_connections={cfg['max_connections']} must exceed --max_queue + --max_batch_size "
                        f"({cfg['max_queue'] + cfg['max_batch_size']}), or queued requests would be refused",
                        "Server")
    if cfg["scheduler"] not in ("continuous", "static"):
        raise UserError(f"--scheduler must be continuous or static, got {cfg['scheduler']!r}", "Server")
    for origin in cfg["allowed_origins"]:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("//")[1]):
            raise UserError(f"--allowed_origins={origin}: an origin looks like https://app.example or "
                            "http://localhost:3000 (no path), or * for any", "Server")


def read_api_key(cfg: dict) -> str:
    """--api_key, else --api_key_file, else $MODERN_LLM_API_KEY, else no key. Never printed."""
    if cfg["api_key"] and cfg["api_key_file"]:
        raise UserError("give --api_key or --api_key_file, not both", "Server")
    if cfg["api_key_file"]:
        try:
            key = Path(cfg["api_key_file"]).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --api_key_file={cfg['api_key_file']}: "
                            f"{getattr(e, 'strerror', None) or type(e).__name__}", "Server") from None
        if not key:
            raise UserError(f"--api_key_file={cfg['api_key_file']} is empty", "Server")
        return key
    return cfg["api_key"] or os.environ.get(API_KEY_ENV, "").strip()


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    check_flags(cfg)
    api_key = read_api_key(cfg)
    for name, value in (("api_key", api_key), ("model_name", cfg["model_name"])):  # sent as text in headers, JSON
        utf8_text(value, f"--{name}")
    if cfg["benchmark"]:
        from benchmarks.serving import benchmark
        return benchmark(cfg["checkpoint"], cfg["device"])
    sock = listen(cfg["host"], cfg["port"])
    engine = Engine(cfg["checkpoint"], device=cfg["device"], dtype=cfg["dtype"], quantize=cfg["quantize"] or None,
                    compile=cfg["compile"], max_batch_size=cfg["max_batch_size"])
    name = cfg["model_name"] or Path(cfg["checkpoint"]).resolve().name
    app = create_app(engine, name, api_key, cfg["max_batch_size"], cfg["max_queue"], cfg["batch_window_ms"],
                     cfg["max_request_bytes"], cfg["body_timeout_s"], cfg["scheduler"], cfg["host"],
                     cfg["allowed_hosts"], cfg["allowed_origins"])
    if cfg["host"] not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {cfg['host']} without an API key: anyone who can reach it can use it")
    print(f"serving {name} at {base_url(sock)}/v1 (Ctrl-C stops)")
    print(f"chat page: open {base_url(sock)}/ in a browser", flush=True)
    config = server_config(app, "info", cfg["max_connections"], cfg["header_timeout_s"], cfg["keep_alive_s"],
                           cfg["max_header_bytes"])
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_main(main)
