"""
How good is a checkpoint on some text? Loss, perplexity and bits per byte on any source the data pipeline reads
(a text file, a folder of them, a JSONL file, a Hugging Face dataset name, "builtin"):

    python evaluate_model.py --checkpoint=out --dataset=valid.txt

The text is tokenized with the checkpoint's own tokenizer (prepare_data.tokenize_source: documents joined with
EOS) and cut into windows of SEQ_LEN tokens that do not overlap: window i reads tokens[iL : iL+L] and predicts
tokens[iL+1 : iL+L+1], so every token but the first is predicted exactly once.

    loss          = total nats / predicted tokens       (mean next-token cross-entropy)
    perplexity    = exp(loss)
    bits per byte = total nats / ln 2 / UTF-8 bytes of the text

Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies; loss and
perplexity are per token and only compare models that share a tokenizer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import load_model, resolve_checkpoint
from cli import UserError, parse_flags, pick_device, pick_dtype, run_main, settings_block

CHECKPOINT = "out"  # checkpoint directory, or a training run's OUT_DIR (meaning its newest checkpoint)
DATASET = ""  # text file, folder, .jsonl, "builtin" or a Hugging Face dataset name (see README: Data)
TEXT_FIELD = "text"  # the column holding the text, for JSONL files and datasets
CONFIG_NAME = ""  # the dataset's configuration (subset) name, if it has several
MAX_TOKENS = 0  # evaluate on the first N tokens only (0: all of them)
SEQ_LEN = 0  # window length in tokens (0: the model's context length)
BATCH_SIZE = 8  # windows per forward pass
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
DTYPE = "float32"  # float32 (exact figures), bfloat16 or float16 (half the memory on a GPU), auto
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


def windows(tokens: torch.Tensor, seq_len: int, batch_size: int):
    """Batches (x, y) of consecutive non-overlapping windows; the last, shorter window is padded with targets
    of -100 (ignored), which the causal attention keeps from touching the real positions before them."""
    n = len(tokens) - 1  # predicted tokens
    starts = list(range(0, n, seq_len))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        x = torch.zeros(len(group), seq_len, dtype=torch.long)
        y = torch.full((len(group), seq_len), -100, dtype=torch.long)
        for row, s in enumerate(group):
            t = min(seq_len, n - s)
            x[row, :t] = tokens[s:s + t]
            y[row, :t] = tokens[s + 1:s + 1 + t]
        yield x, y


@torch.inference_mode()
def total_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int, device="cpu") -> float:
    """Sum over every predicted token of -ln p(token | the window's tokens before it), in nats."""
    from tqdm import tqdm

    n_batches = math.ceil(math.ceil((len(tokens) - 1) / seq_len) / batch_size)
    total = 0.0
    for x, y in tqdm(windows(tokens, seq_len, batch_size), total=n_batches, desc="evaluating", unit="batch"):
        logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                 reduction="sum").item()
    return total


def metrics(total_nats: float, n_predicted: int, n_bytes: int) -> dict[str, float]:
    loss = total_nats / n_predicted
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total_nats / math.log(2) / n_bytes,
            "tokens": n_predicted, "bytes": n_bytes}


def evaluate_checkpoint(checkpoint: str, dataset: str, text_field: str = "text", config_name: str | None = None,
                        max_tokens: int | None = None, seq_len: int = 0, batch_size: int = 8, device="cpu",
                        dtype: torch.dtype = torch.float32) -> dict[str, float]:
    from prepare_data import load_tokenizer, tokenize_source

    path = resolve_checkpoint(checkpoint)
    model = load_model(path, device, dtype).eval()
    tokenizer = load_tokenizer(path)
    seq_len = seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq_len={seq_len} exceeds the model's context of {model.cfg.max_seq_len}",
                        "Evaluation errors")
    tokens, n_bytes = tokenize_source(dataset, tokenizer, text_field=text_field, config_name=config_name,
                                      max_tokens=max_tokens)
    tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    if len(tokens) < 2 or n_bytes == 0:
        raise UserError(f"{dataset}: {len(tokens)} token(s); evaluation needs at least 2", "Evaluation errors")
    if int(tokens.max()) >= model.cfg.vocab_size:
        raise UserError(f"the tokenizer in {path} produces token {int(tokens.max())}, beyond the model's "
                        f"vocabulary of {model.cfg.vocab_size}: tokenizer and weights do not belong together",
                        "Checkpoint does not load")
    return metrics(total_loss(model, tokens, seq_len, batch_size, device), len(tokens) - 1, n_bytes)


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    if not cfg["dataset"]:
        raise UserError("say what to evaluate on: --dataset=FILE_OR_NAME", "Evaluation errors")
    if cfg["batch_size"] < 1 or cfg["seq_len"] < 0 or cfg["max_tokens"] < 0:
        raise UserError("--batch_size must be >= 1, --seq_len and --max_tokens >= 0", "Evaluation errors")
    device = pick_device(cfg["device"])
    m = evaluate_checkpoint(cfg["checkpoint"], cfg["dataset"], cfg["text_field"], cfg["config_name"] or None,
                            cfg["max_tokens"] or None, cfg["seq_len"], cfg["batch_size"], device,
                            pick_dtype(cfg["dtype"], device, cpu_bf16=False))
    print(f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  bits/byte {m['bits_per_byte']:.4f}  "
          f"({m['tokens']:,} tokens predicted, {m['bytes']:,} bytes of text)")
    return 0


if __name__ == "__main__":
    run_main(main)
