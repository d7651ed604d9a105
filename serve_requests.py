"""
What serve.py accepts from a caller, checked cheapest first so that no request can hold up the others:

1. the connection: the Host header must name this server (DNS rebinding), a request carrying an Origin header
   must come from this server's own pages or an allowed origin (cross-site), a POST body must be declared JSON
   (browsers send text/plain and form bodies to any site without asking first);
2. the body: its size and the time it takes to arrive;
3. its JSON against strict request models: an unknown field is a 400 naming it (with a guess at the one meant),
   except a few that OpenAI clients send routinely and that change nothing here;
4. sizes that need no tokenizer: characters, prompts, messages, rows.
Only then is anything tokenized, off the event loop (serve.py).
"""

from __future__ import annotations

import asyncio
import difflib
import ipaddress
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

# -----------------------------------------------------------------------------
# Errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -----------------------------------------------------------------------------
# 1. The connection: Host, Origin, Content-Type


def host_name(host_header: str) -> str:
    """The name part of a Host header: "[::1]:8000" -> "::1", "Example.com.:80" -> "example.com"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class CallerGuard:
    """ASGI middleware that runs before everything else (the API key and the body come after it).

    Hosts: the address the server is bound to, the loopback names when it is bound to loopback, any IP address
    when it listens on all interfaces (a rebinding attack needs a DNS name), and `allowed_hosts` ("*": any).
    Origins: the server's own ("http://" + the Host header), and `allowed_origins` ("*": any).
    """

    def __init__(self, app, bound_host: str, allowed_hosts: list[str], allowed_origins: list[str]):
        self.app = app
        bound = host_name(bound_host)
        self.hosts = {bound} | {host_name(h) for h in allowed_hosts}
        if bound == "localhost" or (is_ip(bound) and ipaddress.ip_address(bound).is_loopback):
            self.hosts |= {"localhost", "127.0.0.1", "::1"}
        self.any_ip = is_ip(bound) and ipaddress.ip_address(bound).is_unspecified  # 0.0.0.0 or ::
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def refusal(self, scope) -> APIError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host_name(host)
        if not ("*" in self.hosts or name in self.hosts or (self.any_ip and is_ip(name))):
            return APIError(421, f"Host header {host!r} is not this server's; if it is the name clients use, start "
                            f"the server with --allowed_hosts={name or 'NAME'} (see README: Server)",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None:
            same = origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()
            if not (same or "*" in self.origins or origin.rstrip("/").lower() in self.origins):
                return APIError(403, f"cross-origin request from {origin!r} refused; to allow pages from it, start "
                                f"the server with --allowed_origins={origin} (see README: Server)",
                                code="origin_not_allowed")
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and media != "application/json":
            return APIError(415, "a POST body must be JSON: send the header 'Content-Type: application/json'",
                            code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        problem = self.refusal(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await problem.response()(scope, receive, send)


# -----------------------------------------------------------------------------
# 2. The body


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it is known to be too large (the declared length, then each piece), and
    only waited for timeout_s seconds: a client that stalls halfway gets a 408, not a worker."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body over {max_bytes} bytes", code="request_too_large")

    async def pieces() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise APIError(413, f"request body over {max_bytes} bytes", code="request_too_large")
        return bytes(body)

    try:
        return await asyncio.wait_for(pieces(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="timeout") from None


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


# -----------------------------------------------------------------------------
# 3. Request models. Strict types: "0.5" is not a number and 1 is not a boolean, as in OpenAI's API.


def one_of(description: str) -> WrapValidator:
    """A union type whose error says what was expected, instead of one error per member of the union."""

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("wrong_type", f"must be {description}") from None

    return WrapValidator(check)


STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Stop = Annotated[str | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=4)]
                 | None, one_of("a string or a list of up to 4 non-empty strings of up to 256 characters")]
# Fields OpenAI clients send routinely that change nothing for one local model: accepted and ignored.
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")
# OpenAI options this server does not implement: refused when set to anything but "off" (null, false, 0, "",
# [], {}; for best_of, n), never silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "best_of", "tools", "tool_choice",
               "functions", "function_call", "response_format")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share. `model` is accepted and ignored: this server serves one model."""

    model_config = STRICT
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
    # IGNORED
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # UNSUPPORTED: declared so that their refusal can say so (see refuse_unsupported)
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    logit_bias: Any = None
    best_of: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator("*", mode="before")
    @classmethod
    def null_means_default(cls, value, info):
        """Some clients send `"temperature": null` for "not set"; OpenAI reads it as the default."""
        spec = cls.model_fields[info.field_name]
        return spec.get_default() if value is None and not spec.is_required() else value

    def refuse_unsupported(self) -> None:
        for name in UNSUPPORTED:
            value = getattr(self, name)
            off = value in (None, False, "", [], {}) or (name == "best_of" and value == self.n)
            if not off or value is True:  # True == 1 in Python, but best_of=true is no number
                raise APIError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]],
                      one_of("a string, a list of strings, a list of token ids or a list of lists of token ids")]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], one_of("a string or a list of text parts")]
    name: str | None = None  # the speaker's name, which some clients send; ignored

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


def known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields allowed where `loc` points (the request, a message, stream_options), for a did-you-mean."""
    inner = {"messages": Message, "stream_options": StreamOptions}.get(loc[0]) if len(loc) > 1 else None
    return list((inner or model).model_fields)


def parse_request(model: type[SamplingRequest], body: Any, most_items: int) -> SamplingRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field. A list of prompts or
    messages longer than most_items is refused before pydantic looks at its items."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("prompt", "messages"):
        if isinstance(body.get(name), list) and len(body[name]) > most_items:
            raise APIError(400, f"{name} has {len(body[name])} items; this server takes at most {most_items}",
                           param=name)
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(err["loc"][-1]), known_fields(model, err["loc"]), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise APIError(400, f"unknown field {param!r}{hint} (see README: Server)", param=param) from None
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:60]})"
        raise APIError(400, f"{param}: {err['msg']}{got}", param=param) from None
    req.refuse_unsupported()
    return req


# -----------------------------------------------------------------------------
# 4. Sizes that need no tokenizer


def check_sizes(req: SamplingRequest, max_rows: int, max_chars: int) -> None:
    """Rows (prompts x n) and characters. A prompt of more than max_chars characters cannot fit the context
    whatever its tokens (max_chars = context x the longest token), so it is refused without tokenizing it."""
    if isinstance(req, ChatRequest):
        texts, param = [m.text() for m in req.messages], "messages"
        prompts = 1
    else:
        many = isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int)
        texts = [p for p in (req.prompt if many else [req.prompt]) if isinstance(p, str)]
        prompts, param = len(req.prompt) if many else 1, "prompt"
    if prompts * req.n > max_rows:
        raise APIError(400, f"{prompts} prompt(s) x n={req.n} = {prompts * req.n} choices; this server decodes at "
                       f"most {max_rows} at once", param="n")
    chars = max(map(len, texts), default=0) if param == "prompt" else sum(map(len, texts))
    if chars > max_chars:
        raise APIError(400, f"the prompt has {chars} characters: more than fit this model's context (at most "
                       f"{max_chars})", param=param, code="context_length_exceeded")
