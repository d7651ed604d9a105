"""serve.py against callers that mean harm, on loopback only, each bounded by short timeouts: slow loris, stalled
and oversized bodies, malformed HTTP, web pages from other sites, DNS rebinding, too many connections."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import serve
from engine import Engine
from serve_requests import CallerGuard

TIMEOUT_S = 1.0  # the servers here give headers and bodies one second


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(str(tiny_checkpoint), device="cpu", dtype="float32")


def start(engine, max_connections=64, **app_options):
    app = serve.create_app(engine, "tiny", body_timeout_s=TIMEOUT_S, **app_options)
    return serve.start_in_thread(app, serve.listen("127.0.0.1", 0), header_timeout_s=TIMEOUT_S,
                                 max_connections=max_connections)


@pytest.fixture(scope="module")
def url(engine):
    srv, url = start(engine)
    yield url
    srv.should_exit = True


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (at most 10 s of silence)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def head(url: str, method="POST", path="/v1/completions", host=None, extra: str = "") -> bytes:
    host = host or url.removeprefix("http://")
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}".encode()


def health_ok(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).json()["status"] == "ok"


def test_half_sent_headers_are_cut_off_and_health_stays_up(url):
    """Slow loris: connections that send part of their headers, or trickle them a byte at a time, are closed
    after the header timeout; other clients are served meanwhile."""
    stalled = [connect(url) for _ in range(20)]
    for sock in stalled:
        sock.sendall(head(url) + b"X-Half: ")
    assert health_ok(url)
    assert all(read_all(sock) == b"" for sock in stalled)  # closed, with nothing to say
    trickle = connect(url)
    closed = False
    for byte in head(url) + b"X-Slow: " + b"a" * 60:  # 0.1 s a byte: 10 s for all, 1 s allowed
        try:
            trickle.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.1)
    assert closed or read_all(trickle) == b""
    for sock in stalled + [trickle]:
        sock.close()


def test_a_stalled_body_answers_408(url):
    sock = connect(url)
    sock.sendall(head(url, extra="Content-Type: application/json\r\nContent-Length: 100\r\n\r\n") + b'{"prompt":')
    reply = read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply


def test_oversized_and_malformed_requests_are_refused_cheaply(url):
    sock = connect(url)  # a declared length over the limit is refused before any of the body is sent
    sock.sendall(head(url, extra="Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"))
    assert read_all(sock).startswith(b"HTTP/1.1 413")
    sock = connect(url)
    sock.sendall(head(url, extra="X-Big: " + "a" * 100_000 + "\r\n\r\n"))
    assert read_all(sock).startswith(b"HTTP/1.1 431")  # headers over --max_header_bytes
    sock = connect(url)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    assert read_all(sock).startswith(b"HTTP/1.1 400")
    assert health_ok(url)


def test_a_1mb_prompt_is_refused_untokenized_while_health_stays_fast(url, engine):
    """The ~1 MB prompt is refused by its length in characters, in a worker thread, while a stalled client
    holds a connection and /health keeps answering."""
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    stalled = connect(url)
    stalled.sendall(head(url, extra="Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{"))
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "x" * 999_000}, timeout=30)
            answered = [health_ok(url) for _ in range(5)]
            r = big.result(timeout=30)
    finally:
        engine.tokenizer.encode = encode
        stalled.close()
    assert all(answered)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"] and not calls


def test_web_pages_from_other_sites_are_refused(url):
    """A page on another site may send a 'simple' cross-site POST (text/plain or a form) without asking the
    server first; with an Origin it is refused outright, and without one, as anything but JSON."""
    evil = {"Origin": "http://evil.example"}
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=evil, timeout=10)
    assert r.status_code == 403 and "--allowed_origins=http://evil.example" in r.json()["error"]["message"]
    r = httpx.options(url + "/v1/completions", headers=evil | {"Access-Control-Request-Method": "POST"}, timeout=10)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    for media in ("text/plain", "application/x-www-form-urlencoded", ""):
        r = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                       headers={"Content-Type": media}, timeout=10)
        assert r.status_code == 415, media
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": url},
                   timeout=30)
    assert r.status_code == 200  # the server's own pages


def test_dns_rebinding_host_headers_are_refused(url):
    """A name the attacker controls that resolves to 127.0.0.1 arrives as its Host header: every route refuses."""
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        r = httpx.request(method, url + path, headers={"Host": "rebind.attacker.example:8000"},
                          json={"prompt": "hi"} if method == "POST" else None, timeout=10)
        assert r.status_code == 421 and "--allowed_hosts=rebind.attacker.example" in r.json()["error"]["message"]
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert httpx.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200


def test_allowed_hosts_and_origins(engine):
    srv, url = start(engine, allowed_hosts=["llm.lan"], allowed_origins=["http://app.example"])
    try:
        assert httpx.get(url + "/health", headers={"Host": "llm.lan:80"}, timeout=10).status_code == 200
        app = {"Origin": "http://app.example"}
        r = httpx.options(url + "/v1/chat/completions", timeout=10, headers=app | {
            "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=app, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.get(url + "/health", headers={"Origin": "http://other.example"}, timeout=10).status_code == 403
    finally:
        srv.should_exit = True


@pytest.mark.parametrize("bound, host, ok", [
    ("0.0.0.0", "192.168.1.5:8000", True), ("0.0.0.0", "[fe80::1]:8000", True), ("0.0.0.0", "evil.example", False),
    ("127.0.0.1", "localhost", True), ("127.0.0.1", "192.168.1.5", False), ("::1", "[::1]:8000", True),
    ("llm.lan", "LLM.lan.:8000", True), ("127.0.0.1", "", False)])
def test_which_host_headers_name_this_server(bound, host, ok):
    guard = CallerGuard(None, bound, [], [])
    scope = {"type": "http", "method": "GET", "headers": [(b"host", host.encode())] if host else []}
    assert (guard.refusal(scope) is None) == ok


def test_connection_limit_answers_503_and_recovers(engine):
    srv, url = start(engine, max_connections=4)
    idle = [connect(url) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the server accept them
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        for sock in idle:  # the idle connections are cut off at the header timeout: the server is free again
            assert read_all(sock) == b""
        assert health_ok(url)
    finally:
        for sock in idle:
            sock.close()
        srv.should_exit = True


def test_many_hostile_clients_at_once_leave_the_server_serving(url):
    """Stalled, oversized, cross-site and malformed callers together, from threads; then a normal request."""
    def stall():
        sock = connect(url)
        sock.sendall(head(url) + b"X-Half: ")
        return read_all(sock) == b""

    def cross_site():
        return httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers={"Origin": "null"},
                          timeout=10).status_code == 403

    def oversized():
        return httpx.post(url + "/v1/completions", content=b"x" * 1_100_000,
                          headers={"Content-Type": "application/json"}, timeout=10).status_code == 413

    jobs = [stall, cross_site, oversized] * 6
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    assert all(results)
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert threading.active_count() < 200  # nothing piled up
