"""
Serving under load: `serve.py` in its own process on a free loopback port, and streaming clients (threads of
this process, sharing one HTTP connection pool) arriving ARRIVAL_MS apart, each
sending REQUESTS_PER_CLIENT requests one after another, at 1, 4, 16 and 64 concurrent clients. The static
scheduler (a batch runs until its last row ends while later requests wait, serve.py before continuous batching)
and the continuous one (requests join the running batch at the next decode step) run side by side on one
engine: tokens/s, time to first token and inter-token latency (p50 / p95).

    python speed_optimizations_2025.py serving                       # a random-weight `small` model
    python speed_optimizations_2025.py serving --checkpoint=out      # the same as:
    python serve.py --checkpoint=out --benchmark
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from cli import UserError, parse_flags, run_main, settings_block

CHECKPOINT = ""  # the checkpoint to serve; empty: a random-weight `small` model (speed does not depend on weights)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
CLIENTS: list = []  # concurrent clients per round (repeatable); empty: 1, 4, 16 and 64
REQUESTS_PER_CLIENT = 2  # requests each client sends, one after another
MAX_TOKENS: list = []  # new tokens per request, cycling over clients (repeatable); empty: 16, 32 and 64
ARRIVAL_MS = 50  # clients start this far apart
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

SCHEDULERS = ("static", "continuous")


def random_small_checkpoint(folder: Path) -> Path:
    """The `small` preset with random weights and a BPE trained on the built-in corpus, saved as a checkpoint."""
    import torch

    import checkpoint
    import corpora
    import modern_llm
    import prepare_data

    tokenizer = prepare_data.train_tokenizer(corpora.builtin_documents(), vocab_size=8192)
    torch.manual_seed(0)
    model = modern_llm.LLM(modern_llm.model_preset("small", vocab_size=len(tokenizer)))
    ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    return checkpoint.save_checkpoint(model, folder / "small", extra=tokenizer.save_pretrained, token_ids=ids)


def one_request(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """Stream one completion: seconds to the first token, the gaps between the following ones, tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return arrivals[0] - start, list(np.diff(arrivals)), tokens


def load(url: str, clients: int, requests: int, lengths: list[int], arrival_s: float) -> dict:
    """`clients` closed-loop streaming clients, started arrival_s apart; the round's figures."""
    ttft, gaps, tokens = [], [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        time.sleep(i * arrival_s)
        for r in range(requests):
            prompt = f"Client {i}, request {r}: once upon a time" + " there was" * (i % 5)
            first, between, n = one_request(http, url, prompt, lengths[(i + r) % len(lengths)])
            with lock:
                ttft.append(first)
                gaps.extend(between)
                tokens.append(n)

    # One client object for all (its setup is costly), with a connection for each client.
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        seconds = time.perf_counter() - start
    p = lambda values, q: float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
    return {"tokens_per_s": sum(tokens) / seconds, "ttft_p50": p(ttft, 50), "ttft_p95": p(ttft, 95),
            "itl_p50": p(gaps, 50), "itl_p95": p(gaps, 95)}


def start_server(checkpoint: str, device: str, scheduler: str, clients: int) -> tuple[subprocess.Popen, str]:
    """python serve.py on a free port, queue and connection limits sized for the clients; returns it and its URL."""
    serve_py = Path(__file__).resolve().parent.parent / "serve.py"
    proc = subprocess.Popen([sys.executable, str(serve_py), f"--checkpoint={checkpoint}", f"--device={device}",
                             "--port=0", f"--scheduler={scheduler}", f"--max_queue={2 * clients}",
                             f"--max_connections={4 * clients + 64}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise UserError(f"serve.py did not start: {line.strip() or proc.stdout.read()[-300:]}", "Server")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # its access log must not fill the pipe
    return proc, line.split()[3].removesuffix("/v1")


def benchmark(checkpoint: str, device: str, clients: tuple[int, ...] = (1, 4, 16, 64),
              requests: int = REQUESTS_PER_CLIENT, lengths: tuple[int, ...] = (16, 32, 64),
              arrival_ms: float = ARRIVAL_MS) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or str(random_small_checkpoint(Path(tmp)))
        print(f"{checkpoint or 'a random-weight `small` model'} (device {device}); clients {arrival_ms:g} ms apart, "
              f"{requests} streaming requests each, {'/'.join(map(str, lengths))} new tokens (cycling), greedy; "
              "at most 16 rows decode together")
        results = {}
        for scheduler in SCHEDULERS:
            proc, url = start_server(path, device, scheduler, max(clients))
            try:
                with httpx.Client(timeout=600) as http:
                    one_request(http, url, "warm-up", 4)
                for n in clients:
                    results[scheduler, n] = load(url, n, requests, list(lengths), arrival_ms / 1000)
            finally:
                proc.terminate()
                proc.wait(30)
    print("| clients | tokens/s old | tokens/s new | x | TTFT p50 old / new | TTFT p95 old / new | "
          "inter-token p50 old / new | inter-token p95 old / new |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ms = lambda a, b, key: f"{a[key] * 1000:.0f} / {b[key] * 1000:.0f} ms"  # noqa: E731
    for n in clients:
        old, new = results["static", n], results["continuous", n]
        print(f"| {n} | {old['tokens_per_s']:.1f} | {new['tokens_per_s']:.1f} | "
              f"{new['tokens_per_s'] / old['tokens_per_s']:.2f} | {ms(old, new, 'ttft_p50')} | "
              f"{ms(old, new, 'ttft_p95')} | {ms(old, new, 'itl_p50')} | {ms(old, new, 'itl_p95')} |")
    return 0


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    try:
        clients = [int(c) for c in cfg["clients"]] or [1, 4, 16, 64]
        lengths = [int(n) for n in cfg["max_tokens"]] or [16, 32, 64]
    except ValueError:
        raise UserError("--clients and --max_tokens take whole numbers, e.g. --clients=4", "Server") from None
    return benchmark(cfg["checkpoint"], cfg["device"], clients, cfg["requests_per_client"], lengths,
                     cfg["arrival_ms"])


if __name__ == "__main__":
    run_main(main)
