"""
An OpenAI-compatible HTTP API for a checkpoint, on FastAPI + uvicorn, built on text_generator's engine.

    python serve.py --checkpoint=out                       # http://127.0.0.1:8000/v1
    python serve.py --checkpoint=out --api_key=secret      # clients must send "Authorization: Bearer secret"

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint tokenizer's chat
template), GET /health. Any OpenAI client works: point its base_url at http://127.0.0.1:8000/v1.

How concurrent requests are served: one worker thread owns the engine. Requests wait in a queue; the worker
takes every request that arrived within BATCH_WINDOW_MS of the first one (up to MAX_BATCH_SIZE rows, a row
being one prompt x one of `n` choices) and decodes them as one batch, streaming each row's tokens back to its
request. A batch runs until its last row ends; requests arriving meanwhile wait for the next batch. A client
that disconnects ends its rows at the next decode step, and a full queue answers 503 instead of growing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator
from pydantic_core import PydanticCustomError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from cli import UserError, parse_flags, run_main, settings_block, utf8_text
from text_generator import Engine, SamplingParams

CHECKPOINT = "out"  # checkpoint directory: a run's OUT_DIR or any Llama checkpoint directory
HOST = "127.0.0.1"  # address to listen on; 0.0.0.0 exposes the server to the network (set --api_key then)
PORT = 8000  # TCP port to listen on (0 picks a free one)
API_KEY = ""  # if set, every route but /health needs the header "Authorization: Bearer API_KEY"
MODEL_NAME = ""  # model id in responses and /v1/models (default: the checkpoint directory's name)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
DTYPE = "auto"  # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
QUANTIZE = ""  # "int8": weight-only int8 (faster decoding, a quarter of the weight bytes); empty for none
COMPILE = False  # torch.compile the decode step (slow start, faster tokens)
MAX_BATCH_SIZE = 16  # most rows (prompts x n) decoded together; also the most one request may ask for
MAX_QUEUE = 64  # most requests waiting for a batch; one more answers 503
BATCH_WINDOW_MS = 20  # how long the first request of a batch waits for others to join it
MAX_REQUEST_BYTES = 1_000_000  # a larger request body answers 413
BENCHMARK = False  # instead of serving: measure requests/s and tokens/s at 1, 4 and 16 concurrent clients
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

# -----------------------------------------------------------------------------
# Errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -----------------------------------------------------------------------------
# Requests. Strict types: "0.5" is not a number and 1 is not a boolean, as in OpenAI's API.


def one_of(description: str) -> WrapValidator:
    """A union type whose error says what was expected, instead of one error per member of the union."""

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("wrong_type", f"must be {description}") from None

    return WrapValidator(check)


Stop = Annotated[str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
                 one_of("a string or a list of up to 4 non-empty strings")]
# OpenAI options this server does not implement: refused when set, rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions", "response_format")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share. `model` is accepted and ignored: this server serves one model."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # default: the rest of the model's context
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("*", mode="before")
    @classmethod
    def null_means_default(cls, value, info):
        """Some clients send `"temperature": null` for "not set"; OpenAI reads it as the default."""
        spec = cls.model_fields[info.field_name]
        return spec.get_default() if value is None and not spec.is_required() else value

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name):
                raise APIError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]],
                      one_of("a string, a list of strings, a list of token ids or a list of lists of token ids")]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], one_of("a string or a list of text parts")]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


def parse_request(model: type[SamplingRequest], body: Any) -> SamplingRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:60]})"
        raise APIError(400, f"{param}: {err['msg']}{got}", param=param) from None
    req.refuse_unsupported()
    return req


async def read_json(request: Request) -> Any:
    """The body as JSON, read in pieces so an oversized body is refused before it is all in memory."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > request.app.state.max_request_bytes:
            raise APIError(413, f"request body over {request.app.state.max_request_bytes} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


# -----------------------------------------------------------------------------
# The scheduler: a queue of jobs in front of one worker thread that decodes them in batches

DONE = object()  # the worker's last message to a job


@dataclass(eq=False)  # hashable by identity
class Job:
    """One request: its rows (prompt token ids, sampling parameters) and the queue its events arrive on."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def deliver(self, item) -> None:
        """Called from the worker thread: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Scheduler:
    def __init__(self, engine, max_batch_size: int, max_queue: int, window_s: float):
        self.engine, self.max_batch_size, self.max_queue, self.window_s = engine, max_batch_size, max_queue, window_s
        self.waiting: deque[Job] = deque()
        self.running_rows = 0
        self.cond = threading.Condition()
        threading.Thread(target=self.work, name="engine", daemon=True).start()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
        """Queue a request (call from the event loop); 503 when the queue is full."""
        job = Job(prompts, params, asyncio.get_running_loop(), asyncio.Queue())
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise APIError(503, f"server busy: {len(self.waiting)} requests already queued; retry later",
                               type="server_error", code="queue_full")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def next_batch(self) -> list[Job]:
        """Wait for a request, give others BATCH_WINDOW_MS to join it, then take as many as fit."""
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            deadline = time.monotonic() + self.window_s
            while sum(len(j.prompts) for j in self.waiting) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch, rows = [], 0
            while self.waiting and rows + len(self.waiting[0].prompts) <= self.max_batch_size:
                job = self.waiting.popleft()
                if not job.cancelled:  # its client left while it waited
                    batch.append(job)
                    rows += len(job.prompts)
            self.running_rows = rows
            return batch

    def work(self) -> None:
        while True:
            batch = self.next_batch()
            if batch:
                self.run(batch)
            self.running_rows = 0

    def run(self, batch: list[Job]) -> None:
        owner = [(job, i) for job in batch for i in range(len(job.prompts))]  # batch row -> (job, its row)
        prompts = [p for job in batch for p in job.prompts]
        params = [p for job in batch for p in job.params]
        unfinished = {job: len(job.prompts) for job in batch}
        try:
            for step in self.engine.stream(prompts, params, cancelled=lambda row: owner[row][0].cancelled):
                events: dict[Job, list] = {}
                for row, event in enumerate(step):
                    if event is not None:
                        job, i = owner[row]
                        events.setdefault(job, []).append((i, event))
                        unfinished[job] -= event.finish_reason is not None
                for job, items in events.items():
                    job.deliver(items)
                    if not unfinished[job]:  # answer now, not when the batch's longest row ends
                        job.deliver(DONE)
            for job in batch:
                if unfinished[job]:
                    job.deliver(DONE)
        except Exception as e:  # one bad batch must not kill the worker: its requests get the error
            traceback.print_exc()
            for job in batch:
                job.deliver(e)


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
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # templates may refuse a conversation, e.g. roles that do not alternate
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return [encode(tok, text)]
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


def engine_rows(engine, req: SamplingRequest, prompts: list[list[int]],
                max_rows: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """n rows per prompt (choice index = prompt * n + j), each with its SamplingParams, checked against the
    context: OpenAI refuses a request whose prompt plus max_tokens exceeds it, rather than cutting it short."""
    rows = len(prompts) * req.n
    if rows > max_rows:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} = {rows} choices; this server decodes at most "
                       f"{max_rows} at once", param="n")
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
# The app


def create_app(engine, model_name: str, api_key: str = "", max_batch_size: int = MAX_BATCH_SIZE,
               max_queue: int = MAX_QUEUE, batch_window_ms: float = BATCH_WINDOW_MS,
               max_request_bytes: int = MAX_REQUEST_BYTES):
    app = FastAPI(title="modern-llm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_request_bytes = max_request_bytes
    scheduler = app.state.scheduler = Scheduler(engine, max_batch_size, max_queue, batch_window_ms / 1000)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

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
        return {"status": "ok", "queued": len(scheduler.waiting), "running_rows": scheduler.running_rows}

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
        req = parse_request(kind, await read_json(request))
        prompts = prompt_token_ids(engine, req)
        row_prompts, row_params = engine_rows(engine, req, prompts, max_batch_size)
        job = scheduler.submit(row_prompts, row_params)
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


def start_in_thread(app, sock: socket.socket) -> tuple[uvicorn.Server, str]:
    """Run the app in a background thread (benchmark, tests); returns the server and its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, base_url(sock)


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    for name in ("max_batch_size", "max_queue"):
        if cfg[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {cfg[name]}", "Server")
    for name in ("api_key", "model_name"):  # sent as text in headers and JSON
        utf8_text(cfg[name], f"--{name}")
    sock = None if cfg["benchmark"] else listen(cfg["host"], cfg["port"])
    engine = Engine(cfg["checkpoint"], device=cfg["device"], dtype=cfg["dtype"], quantize=cfg["quantize"] or None,
                    compile=cfg["compile"], max_batch_size=cfg["max_batch_size"])
    name = cfg["model_name"] or Path(cfg["checkpoint"]).resolve().name
    app = create_app(engine, name, cfg["api_key"], cfg["max_batch_size"], cfg["max_queue"], cfg["batch_window_ms"],
                     cfg["max_request_bytes"])
    if sock is None:
        from benchmarks.serving import benchmark
        return benchmark(app, cfg["api_key"])
    if cfg["host"] not in ("127.0.0.1", "localhost", "::1") and not cfg["api_key"]:
        print(f"warning: listening on {cfg['host']} without --api_key: anyone who can reach it can use it")
    print(f"serving {name} at {base_url(sock)}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_main(main)
