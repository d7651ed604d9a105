"""serve.py over real HTTP on loopback: the official openai client, batching, disconnects, bad requests."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import serve
from text_generator import Engine, SamplingParams

KEY = "sk-test"


class SpyEngine:
    """The real engine, recording each batch it decodes (rows' max_new_tokens, steps run, rows cancelled),
    optionally slowed per step so a test can act while a batch runs, or failing after its first step."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.model = engine, engine.tokenizer, engine.model
        self.max_seq_len = engine.max_seq_len
        self.delay = 0.0
        self.fail = False
        self.batches = []

    def stream(self, prompts, params, cancelled=None):
        record = {"max_new_tokens": [p.max_new_tokens for p in params], "steps": 0, "cancelled": set()}
        self.batches.append(record)

        def spy_cancelled(row):
            if cancelled(row):
                record["cancelled"].add(row)
                return True
            return False

        for step in self.engine.stream(prompts, params, cancelled=spy_cancelled):
            record["steps"] += 1
            time.sleep(self.delay)
            yield step
            if self.fail:
                raise RuntimeError("simulated engine failure")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def spy(engine):
    return SpyEngine(engine)


@pytest.fixture(scope="module")
def server(spy):
    """The app on a free loopback port, uvicorn in a thread; yields (base URL, app)."""
    app = serve.create_app(spy, "tiny", api_key=KEY, max_batch_size=16, max_queue=32, batch_window_ms=50)
    srv, url = serve.start_in_thread(app, serve.listen("127.0.0.1", 0))
    yield url, app
    srv.should_exit = True


@pytest.fixture
def url(server, spy):
    spy.delay, spy.fail = 0.0, False
    return server[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(engine, prompt_ids, max_new_tokens):
    return engine.generate([prompt_ids], [SamplingParams(max_new_tokens=max_new_tokens, temperature=0)])[0]


def chat_ids(engine, messages):
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return serve.encode(engine.tokenizer, text)


def test_openai_client_completion_equals_engine_greedy(client, engine):
    r = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
    want = greedy(engine, serve.encode(engine.tokenizer, "To be, or not"), 12)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_openai_client_chat_and_streaming_chat(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    want = greedy(engine, chat_ids(engine, messages), 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == want.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens


def test_models_health_and_api_key(url, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.models.retrieve("gpt-4")
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)


def test_16_concurrent_streams_are_batched_and_independent(client, engine, spy):
    prompts = [f"Request {i}: the quick brown fox" + " jumps" * (i % 4) for i in range(16)]

    def stream(prompt):
        parts = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in parts)

    before = len(spy.batches)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, prompts))
    assert got == [greedy(engine, serve.encode(engine.tokenizer, p), 16).text for p in prompts]
    sizes = [len(b["max_new_tokens"]) for b in spy.batches[before:]]
    assert sum(sizes) == 16 and max(sizes) > 1  # served together, not one by one


def test_n_choices_and_seed(client):
    def ask(n):
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=n, seed=7)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    three = ask(3)
    assert len(three) == 3 and len(set(three)) > 1  # each choice samples on its own
    assert ask(3) == three  # a seed makes the request reproducible
    assert ask(1) == three[:1]


def test_several_prompts_and_n_stream_as_separate_choices(client, engine):
    prompts = ["Hello", "The quick brown fox"]
    parts = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0, stream=True)
    texts = {}
    for chunk in parts:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    want = [greedy(engine, serve.encode(engine.tokenizer, p), 6).text for p in prompts]
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}  # choice = prompt * n + j


def test_stop_string_ends_the_completion(client, engine):
    full = greedy(engine, serve.encode(engine.tokenizer, "Hello"), 20).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_disconnected_client_frees_its_row_and_others_finish(url, client, engine, spy):
    prompt = "The quick brown fox"
    assert greedy(engine, serve.encode(engine.tokenizer, prompt), 100).finish_reason == "length"  # a long row
    spy.delay = 0.03  # 100 steps would take 3 s: the disconnect lands well inside the batch
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True}
    before = len(spy.batches)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(client.completions.create, model="tiny", prompt="Hello", max_tokens=30, temperature=0)
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # the stream has begun; now hang up
        assert other.result(timeout=30).choices[0].text == greedy(engine, serve.encode(engine.tokenizer, "Hello"),
                                                                   30).text
    long_batches = [b for b in spy.batches[before:] if 100 in b["max_new_tokens"]]
    assert long_batches and all(b["cancelled"] and b["steps"] < 100 for b in long_batches)
    spy.delay = 0.0
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)  # still serving
    assert r.choices[0].finish_reason in ("length", "stop")


def test_client_that_gives_up_on_a_full_response_frees_its_row(url, spy):
    spy.delay = 0.03
    before = len(spy.batches)
    body = {"prompt": "The quick brown fox", "max_tokens": 99, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after half a second
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    deadline = time.monotonic() + 10
    while (len(spy.batches) == before or not spy.batches[-1]["cancelled"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spy.batches[-1]["max_new_tokens"] == [99] and spy.batches[-1]["cancelled"]
    assert spy.batches[-1]["steps"] < 99


def test_an_engine_failure_answers_500_and_the_worker_lives_on(url, client, spy):
    spy.fail = True
    with pytest.raises(openai.InternalServerError, match="simulated engine failure"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Hello", "max_tokens": 5, "stream": True}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
    lines = [x for x in r.text.split("\n") if x]
    assert "simulated engine failure" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    spy.fail = False
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_answers_503(server, url, client, spy):
    scheduler = server[1].state.scheduler
    spy.delay = 0.05
    scheduler.max_queue = 1
    try:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(client.completions.create, model="tiny", prompt="Hi", max_tokens=40, temperature=0)
            while not scheduler.running_rows:  # the worker is busy with the first request
                time.sleep(0.01)
            waiting = pool.submit(client.completions.create, model="tiny", prompt="Hi", max_tokens=2)
            while not scheduler.waiting:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError, match="busy") as e:
                client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
            assert e.value.status_code == 503
            busy.result(timeout=30), waiting.result(timeout=30)
    finally:
        scheduler.max_queue = 32


LONG = "word " * 200  # more tokens than the tiny model's 128-token context

BAD_REQUESTS = [
    # (route, body (dict, or raw bytes), headers, status, words the message must contain)
    ("/v1/completions", b'{"prompt": "hi", ', {}, 400, "not valid JSON"),
    ("/v1/completions", b'["a list"]', {}, 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 3}, {}, 400, "prompt: Field required"),
    ("/v1/chat/completions", {"prompt": "hi"}, {}, 400, "messages: Field required"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, {}, 400, "valid integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, {}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, {}, 400, "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', {}, 400, "finite number"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, {}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": 1}, {}, 400, "stream"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, {}, 400, "prompt: must be a string"),
    ("/v1/completions", {"prompt": [1, 99999]}, {}, 400, "token ids"),
    ("/v1/completions", {"prompt": ""}, {}, 400, "empty"),
    ("/v1/completions", {"prompt": LONG}, {}, 400, "maximum context length is 128"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, {}, 400, "maximum context length is 128"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, {}, 400, "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "up to 4"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, {}, 400, "not supported"),
    ("/v1/chat/completions", {"messages": []}, {}, 400, "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, {}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, {}, 400, "messages.0.content"),
    ("/v1/completions", {"prompt": "x" * 1_100_000}, {}, 413, "bytes"),
    ("/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("/v1/completions", {"prompt": "hi"}, {"Authorization": ""}, 401, "API key"),
    ("/v1/nothing", {}, {}, 404, "Not Found"),
]


@pytest.mark.parametrize("route,body,headers,status,words", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_request_gets_4xx_in_openai_shape(url, route, body, headers, status, words):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + route, content=data, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_cli_serves_and_a_taken_port_is_a_clear_error(tiny_checkpoint):
    proc = subprocess.Popen([sys.executable, serve.__file__, f"--checkpoint={tiny_checkpoint}", "--port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line
        base = line.split()[3]  # http://127.0.0.1:PORT/v1
        assert httpx.get(base.removesuffix("/v1") + "/health", timeout=30).json()["status"] == "ok"
        r = httpx.post(base + "/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        port = int(base.rsplit(":", 1)[1].removesuffix("/v1"))
        with pytest.raises(serve.UserError, match=f"cannot listen on 127.0.0.1:{port}.*--port={port + 1}"):
            serve.main([f"--checkpoint={tiny_checkpoint}", f"--port={port}"])
    finally:
        proc.terminate()
        proc.wait(10)
