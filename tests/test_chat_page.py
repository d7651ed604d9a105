"""The chat page (serve.py's `/`) in a real headless Chromium, driven by Selenium with Debian's chromedriver.

The model is a tiny one fine-tuned here for a few seconds on a handful of chats by the training script, so its
trainer_state.json records the chat task as a user's run would, and its answers are real ones. The engine's model
sleeps a little per forward pass, so that streaming shows and a long answer can be stopped halfway.
The page's screenshot is saved to $TEST_ARTIFACTS (default: the test's temporary folder).
"""

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import checkpoint
import gpu_training_optimized as train
import serve
from conftest import ROOT, make_checkpoint
from engine import Engine

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; nothing is downloaded
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                                 reason="apt-get install chromium chromium-driver (.ci/run does)")]
QA = [("Who wrote Hamlet?", "William Shakespeare."), ("What colour is the sky?", "Blue, on a clear day."),
      ("Which planet is red?", "Mars is the red planet."), ("What do bees make?", "Bees make honey."),
      ("Show me some HTML.", "<b>bold</b> & <i>x</i>")]
STEP_DELAY = 0.05  # seconds slept per forward pass: a 10-token answer streams over half a second


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_tokenizer):
    """A tiny model (512 tokens of context) fine-tuned on one- and two-question chats, each one-question chat
    twice so that the copy held out for validation is trained on too."""
    tmp = tmp_path_factory.mktemp("chat")
    init = make_checkpoint(tmp / "init", tiny_tokenizer, seed=3, max_seq_len=512)
    chats = [[qa] for qa in QA] * 2 + list(itertools.permutations(QA, 2))
    (tmp / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        m for q, a in chat for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]}) + "\n"
        for chat in chats))
    assert train.main([f"--init_from={init}", f"--dataset={tmp / 'chats.jsonl'}", f"--data_root={tmp / 'data'}",
                       f"--out_dir={tmp / 'out'}", "--max_steps=120", "--batch_size=8", "--seq_len=96", "--lr=1e-2",
                       "--warmup_steps=5", "--dtype=float32", "--compile=false", "--max_minutes=0", "--eval_steps=1",
                       "--eval_interval=1000", "--log_interval=1000"]) == 0
    assert checkpoint.trained_on_chats(tmp / "out")  # --task=auto saw chat data and the run recorded it
    return tmp / "out"


@pytest.fixture(scope="module")
def engine(chat_model):
    engine = Engine(str(chat_model), device="cpu", dtype="float32")
    engine.model.register_forward_hook(lambda module, args, out: time.sleep(STEP_DELAY))
    return engine


@pytest.fixture(scope="module")
def url(engine):
    srv, url = serve.start_in_thread(serve.create_app(engine, "tiny-chat"), serve.listen("127.0.0.1", 0))
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,860"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: no Selenium Manager
    yield driver
    driver.quit()


def wait(browser, condition, timeout=20):
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: condition())


def by_id(browser, name):
    return browser.find_element(By.ID, name)


def set_field(browser, name, value):
    field = by_id(browser, name)
    field.clear()
    field.send_keys(value)


def replies(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def watch_updates(browser):
    """Count, in the page, each distinct text the newest answer shows while it streams."""
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll('#log .msg.assistant .text');
            const text = texts.length ? texts[texts.length - 1].textContent : '';
            if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")


def ask(browser, text, paste=False):
    """Type (or paste: a long text typed key by key takes seconds) into the composer and press Enter; wait until
    the answer has ended (Send is back)."""
    count = len(replies(browser))
    field = by_id(browser, "input")
    if paste:
        browser.execute_script("arguments[0].value = arguments[1]", field, text)
    else:
        field.send_keys(text)
    field.send_keys("\n")
    wait(browser, lambda: len(replies(browser)) == count + 1)
    wait(browser, lambda: by_id(browser, "send").is_displayed())
    return replies(browser)[-1]


def sent_requests(browser) -> list[tuple[str, dict]]:
    """(url, JSON body) of each POST the browser sent since the last call, from Chrome's network log."""
    found = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        request = message.get("params", {}).get("request", {})
        if message["method"] == "Network.requestWillBeSent" and request.get("method") == "POST":
            found.append((request["url"], json.loads(request["postData"])))
    return found


def health(url):
    return httpx.get(url + "/health").json()


@pytest.mark.slow  # with the fine-tuning run and the browser's start, over 20 s on a shared 2-core CPU
def test_chat_page_streams_stops_switches_modes_and_shows_server_errors(browser, url, tmp_path):
    started = time.time()
    browser.get(url + "/")
    wait(browser, lambda: by_id(browser, "model").text == "tiny-chat")
    assert "context 512 tokens" in by_id(browser, "context").text
    assert by_id(browser, "mode-chat").is_selected()  # the checkpoint says it was trained on chats
    assert "trainer_state.json records chat fine-tuning" in by_id(browser, "mode-note").text
    sent_requests(browser)

    # A conversation, greedy: each answer streamed in several updates, the trained answers, the conversation
    # so far sent with each question, the model's HTML shown as text.
    set_field(browser, "temperature", "0")
    for turn, (question, expected) in enumerate([QA[0], QA[3], QA[4]]):
        watch_updates(browser)
        answer = ask(browser, question)
        assert answer.find_element(By.CLASS_NAME, "text").text == expected
        assert len(browser.execute_script("return window.seen")) > 1
        assert re.fullmatch(r"\d+ prompt tokens · \d+ tokens · [\d.]+ tokens/s",
                            answer.find_element(By.CLASS_NAME, "stats").text)
        (endpoint, body), = sent_requests(browser)
        assert endpoint == url + "/v1/chat/completions" and body["temperature"] == 0 and body["stream"]
        assert len(body["messages"]) == 2 * turn + 1 and body["messages"][-1] == {"role": "user", "content": question}
    assert not browser.find_elements(By.CSS_SELECTOR, "#log b, #log i")
    artifacts = Path(os.environ.get("TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "chat_page.png"))

    # New chat, a system prompt, then a long answer (hot sampling, 200 tokens: 10 s at least) stopped after a few
    # updates: the server frees its row at once.
    by_id(browser, "new-chat").click()
    assert not replies(browser)
    set_field(browser, "system", "Tell long stories.")
    set_field(browser, "temperature", "1.5")
    set_field(browser, "seed", "1")
    set_field(browser, "max_tokens", "200")
    watch_updates(browser)
    by_id(browser, "input").send_keys("Tell me a long story.\n")
    wait(browser, lambda: len(browser.execute_script("return window.seen")) >= 3)
    assert health(url)["running_rows"] == 1
    by_id(browser, "stop").click()
    wait(browser, lambda: "stopped" in replies(browser)[-1].find_element(By.CLASS_NAME, "stats").text)
    wait(browser, lambda: (health(url)["queued"], health(url)["running_rows"]) == (0, 0), timeout=3)
    (_, body), = sent_requests(browser)
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (1.5, 1, 200)
    assert body["messages"][0] == {"role": "system", "content": "Tell long stories."}

    # Completion mode: the prompt continued, through /v1/completions.
    browser.find_element(By.CSS_SELECTOR, "label:has(#mode-completion)").click()
    assert not replies(browser) and not by_id(browser, "system").is_enabled()
    set_field(browser, "max_tokens", "8")
    answer = ask(browser, "Once upon a time")
    assert answer.find_element(By.CLASS_NAME, "text").text and "error" not in answer.get_attribute("class")
    (endpoint, body), = sent_requests(browser)
    assert endpoint == url + "/v1/completions" and body["prompt"] == "Once upon a time" and "messages" not in body

    # The server's errors, in its words: a prompt beyond the context, a setting it refuses.
    answer = ask(browser, "the quick brown fox " * 200, paste=True)
    assert "error" in answer.get_attribute("class")
    assert "maximum context length is 512 tokens" in answer.find_element(By.CLASS_NAME, "text").text
    set_field(browser, "top_k", "2.5")
    answer = ask(browser, "Once upon a time")
    assert answer.find_element(By.CLASS_NAME, "text").text.startswith("top_k:")
    console = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/v1/" in m for m in console), console  # only the refused requests; nothing blocked by the CSP
    print(f"browser session: {time.time() - started:.1f} s")


def test_a_model_with_no_chat_record_starts_in_completion_mode_and_the_key_is_asked_once(browser, tiny_checkpoint):
    srv, url = serve.start_in_thread(serve.create_app(Engine(str(tiny_checkpoint), device="cpu", dtype="float32"),
                                                      "random", api_key="sk-page"), serve.listen("127.0.0.1", 0))
    try:
        browser.get(url + "/")
        wait(browser, lambda: by_id(browser, "key-dialog").is_displayed())
        assert "incorrect API key" in by_id(browser, "key-note").text
        by_id(browser, "key").send_keys("sk-page\n")
        wait(browser, lambda: by_id(browser, "model").text == "random")
        assert browser.execute_script("return [sessionStorage.length, localStorage.length]") == [1, 0]
        browser.refresh()  # the same tab: the key is still there, no question
        wait(browser, lambda: by_id(browser, "model").text == "random")
        assert not by_id(browser, "key-dialog").is_displayed()
        assert by_id(browser, "mode-completion").is_selected()  # no trainer_state.json: never seen a chat
        assert "records no chat fine-tuning" in by_id(browser, "mode-note").text
        set_field(browser, "max_tokens", "4")
        answer = ask(browser, "Once upon a time")
        assert "error" not in answer.get_attribute("class") and answer.find_element(By.CLASS_NAME, "stats").text
    finally:
        srv.should_exit = True


def test_serve_prints_the_page_address_and_serves_it_with_a_strict_policy(tiny_checkpoint):
    """As a user starts it: the printed address answers with the page, under a policy that runs only its script."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--checkpoint={tiny_checkpoint}", "--port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("chat page: open "):
                break
        else:
            raise AssertionError("serve.py did not start:\n" + "".join(lines))
        page_url = line.split()[3]
        response = httpx.get(page_url)
        assert response.status_code == 200 and "<title>modern-llm chat</title>" in response.text
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert httpx.get(page_url + "info").json()["trained_on_chats"] is False  # a model with no training record
    finally:
        proc.terminate()
        proc.wait(10)
