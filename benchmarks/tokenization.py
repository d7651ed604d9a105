"""
Tokenization speed on the built-in corpus: a Python loop calling the tokenizer once per document, against
Dataset.map(batched=True) in 1 and 2 processes (what prepare_data.prepare runs).

    python prepare_data.py --benchmark         # the same as:
    python speed_optimizations_2025.py tokenization
"""

from __future__ import annotations

import os
import time

from cli import parse_flags, run_main, settings_block
from corpora import builtin_documents
from prepare_data import as_tokenizer, column, tokenize_documents, train_tokenizer

VOCAB_SIZE = 8192  # vocabulary of the BPE trained for the measurement
TOKENIZER = ""  # empty: train a BPE on the corpus; else a tokenizer folder or hub name
REPEATS = 3  # each method runs this many times; the best time counts (a shared machine only slows a run down)
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


def benchmark(vocab_size: int, tokenizer=None, repeats: int = REPEATS) -> int:
    """Tokenization throughput on the built-in corpus: the same tokenizer called once per document in a Python
    loop, against Dataset.map(batched=True) in 1 and 2 processes (what prepare() runs). Best of `repeats`, since
    a shared machine only ever slows a run down. The 2-process runs go last: they turn tokenizer threads off."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    docs = list(builtin_documents())
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tokenizer = as_tokenizer(tokenizer) or train_tokenizer(docs, vocab_size)
    ds = Dataset.from_dict({"text": docs})

    def python_loop():
        return sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)

    def with_map(num_proc):
        return lambda: int(column(tokenize_documents(ds, tokenizer, num_proc), "n_tokens").sum())

    print(f"built-in corpus: {len(docs):,} documents, {mb:.2f} MB; tokenizer {tokenizer.name_or_path or 'BPE'} "
          f"(vocab {len(tokenizer):,}); TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"{'method (best of ' + str(repeats) + ')':<36} {'seconds':>8} {'MB/s':>7} {'speedup':>8}")
    base = None
    runs = [("python loop, one call per document", python_loop), ("Dataset.map batched, 1 process", with_map(1)),
            ("Dataset.map batched, 2 processes", with_map(2))]
    for name, run in runs:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n_tokens = run()
            seconds.append(time.perf_counter() - t0)
        seconds = min(seconds)
        base = base or seconds
        print(f"{name:<36} {seconds:>8.2f} {mb / seconds:>7.2f} {base / seconds:>7.2f}x   ({n_tokens:,} tokens)")
    return 0


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    return benchmark(cfg["vocab_size"], cfg["tokenizer"] or None, cfg["repeats"])


if __name__ == "__main__":
    run_main(main)
