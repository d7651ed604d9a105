"""
Serving speed: closed-loop clients over real HTTP on a free loopback port (each sends a request, waits for the
answer, sends the next), at 1, 4 and 16 concurrent clients: requests/s, tokens/s and latency.

    python serve.py --checkpoint=DIR --benchmark      # the same as:
    python speed_optimizations_2025.py serving --checkpoint=DIR
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cli import parse_flags, run_main, settings_block

CHECKPOINT = "out"  # the checkpoint to serve (a run's OUT_DIR or a checkpoint directory)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
REQUESTS_PER_CLIENT = 4  # requests each client sends, one after another
MAX_TOKENS = 64  # new tokens per request (greedy)
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


def benchmark(app, api_key: str, requests_per_client: int = REQUESTS_PER_CLIENT, max_tokens: int = MAX_TOKENS) -> int:
    """Closed-loop clients over real HTTP: each sends a request, waits for the answer, sends the next."""
    from serve import listen, start_in_thread

    server, url = start_in_thread(app, listen("127.0.0.1", 0))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}

    def client(i: int) -> tuple[int, float]:
        tokens, waited = 0, 0.0
        for r in range(requests_per_client):
            body = {"prompt": f"Client {i}, request {r}: once upon a time", "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
            with urllib.request.urlopen(request) as response:
                tokens += json.load(response)["usage"]["completion_tokens"]
            waited += time.perf_counter() - start
        return tokens, waited

    client(0)  # warm-up
    print(f"{max_tokens} new tokens per request, {requests_per_client} requests per client, greedy")
    print(f"{'clients':>7} {'requests':>8} {'seconds':>8} {'requests/s':>10} {'tokens/s':>9} {'latency s':>9}")
    for clients in (1, 4, 16):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        seconds = time.perf_counter() - start
        n = clients * requests_per_client
        tokens, waited = sum(r[0] for r in results), sum(r[1] for r in results)
        print(f"{clients:>7} {n:>8} {seconds:>8.1f} {n / seconds:>10.2f} {tokens / seconds:>9.1f} {waited / n:>9.2f}")
    server.should_exit = True
    return 0


def main(argv: list[str]) -> int:
    from serve import create_app
    from text_generator import Engine

    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    engine = Engine(cfg["checkpoint"], device=cfg["device"])
    return benchmark(create_app(engine, "bench"), "", cfg["requests_per_client"], cfg["max_tokens"])


if __name__ == "__main__":
    run_main(main)
