"""
Training speed against transformers, best against best: transformers' LlamaForCausalLM at its best (torch.compile,
bf16 autocast, fused AdamW, its own loss) and at its default (eager fp32, torch's default AdamW) next to our
model at its best (the same three switches, our chunked loss) and as `python gpu_training_optimized.py` trains
on a CPU by default (the cpu preset), with the same weights, batch and sequence length.

    python speed_optimizations_2025.py vs_transformers                 # small and 125m, batch 8 x 256
    python speed_optimizations_2025.py vs_transformers --models=small --steps=3

Every row takes the same step: forward, loss, backward, gradient clipping at 1.0, the optimizer step. The rows
take turns, one step each per round, so a machine whose load changes (a shared one) slows all of them alike;
the ratios are the medians of each round's ratio, tokens/s the row's median. On a shared machine the
process's CPU time (both threads' work, not the time spent waiting for a core) moves far less than the
wall-clock, so both are shown. "warm-up s" is the time of the first WARMUP_STEPS steps: compilation shows there.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import gpu_training_optimized as train
import modern_llm as ml
from cli import UserError, parse_flags, pick_dtype, run_main, settings_block
from speed_optimizations_2025 import speed_device, transformers_twin

MODELS = ["small", "125m"]  # size presets to compare (repeatable flag)
DEVICE = "auto"  # auto (cuda when available), cpu or cuda
BATCH_SIZE = 8  # rows per step
SEQ_LEN = 256  # tokens per row
WARMUP_STEPS = 3  # untimed steps of each row first (compilation, then its first slow steps)
STEPS = 5  # timed rounds, one step of every row each
LR = 3e-4  # learning rate of every optimizer (the speed does not depend on it)
SEED = 0  # the same weights and tokens for every row
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


@dataclass
class Row:
    label: str
    step: Callable[[], float]  # one training step, returns the loss
    warmup_s: float = 0.0
    times: list = field(default_factory=list)  # (wall-clock, CPU) seconds of each timed step


def transformers_row(model: ml.LLM, x, y, best: bool) -> Callable[[], float]:
    """LlamaForCausalLM with our weights and its own loss (labels=..., upcast to fp32 logits); best: compiled,
    bf16 autocast, fused AdamW; default: eager fp32 with torch's default AdamW."""
    hf = transformers_twin(model).hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, fused=True if best else None)
    run = torch.compile(hf) if best else hf
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=best)

    def step() -> float:
        with amp:
            loss = run(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss  # y: already shifted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def our_row(model: ml.LLM, x, y, compile_: bool, dtype: torch.dtype) -> Callable[[], float]:
    """Our model as the training script builds it (its compile, fused-AdamW and step functions)."""
    device = x.device
    run = train.compile_model(model, {"compile": compile_, "compile_mode": "auto"}, device)
    opt = train.build_optimizer(model, "adamw", lr=LR, weight_decay=0.1, fused=train.fused_adamw(device, False))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return lambda: train.train_step(run, opt, scaler, [(x, y)], amp, 1.0)[0]


def compare(name: str, device: torch.device, cfg: dict) -> list[Row]:
    model_cfg = ml.model_preset(name)
    if cfg["seq_len"] > model_cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg['seq_len']} exceeds the {name} model's context of {model_cfg.max_seq_len}",
                        "Performance")
    g = torch.Generator().manual_seed(cfg["seed"])
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg["batch_size"], cfg["seq_len"] + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    def ours():
        torch.manual_seed(cfg["seed"])
        return ml.LLM(model_cfg).to(device).train()

    preset = train.HARDWARE["cpu"]
    default_dtype = pick_dtype("auto", device)
    rows = [Row("transformers, default (eager fp32, AdamW)", transformers_row(ours(), x, y, best=False)),
            Row("transformers, best (compile + bf16 autocast + fused AdamW)",
                transformers_row(ours(), x, y, best=True)),
            Row(f"ours, CPU default (cpu preset: {str(default_dtype).removeprefix('torch.')}, compile "
                f"{preset['compile']}, fused AdamW)", our_row(ours(), x, y, preset["compile"], default_dtype)),
            Row("ours, best (compile + bf16 autocast + fused AdamW)", our_row(ours(), x, y, True, torch.bfloat16))]
    for row in rows:
        start = time.perf_counter()
        for _ in range(cfg["warmup_steps"]):
            row.step()
        row.warmup_s = time.perf_counter() - start
    for _ in range(cfg["steps"]):
        for row in rows:
            start, cpu = time.perf_counter(), time.process_time()
            row.step()
            row.times.append((time.perf_counter() - start, time.process_time() - cpu))
    torch._dynamo.reset()
    return rows


def ratio(rows: list[Row], ours: int, theirs: int, clock: int) -> float:
    """Median over the rounds of our speed over theirs in the same round, by wall-clock (0) or CPU (1) time."""
    return statistics.median(t[clock] / o[clock] for o, t in zip(rows[ours].times, rows[theirs].times))


def speed(row: Row, tokens: int, clock: int) -> str:
    return f"{tokens / statistics.median(t[clock] for t in row.times):,.0f}"


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    for name in ("batch_size", "seq_len", "steps"):
        if cfg[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {cfg[name]}", "Performance")
    for name in cfg["models"]:
        ml.model_preset(name)  # an unknown name is refused before any work
    device = speed_device(cfg["device"])
    tokens = cfg["batch_size"] * cfg["seq_len"]
    print(f"training tokens/s, ours vs transformers {train_version()}: batch {cfg['batch_size']} x {cfg['seq_len']}, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {cfg['steps']} "
          f"interleaved rounds after {cfg['warmup_steps']} warm-up steps")
    print("| model | setup | tokens/s | tokens per CPU-s | warm-up s | ratio (wall-clock) | ratio (CPU time) |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name in cfg["models"]:
        rows = compare(name, device, cfg)
        against = {2: (0, "transformers default"), 3: (1, "transformers best")}  # our row: (their row, name)
        for i, row in enumerate(rows):
            theirs, label = against.get(i, (None, ""))
            ratios = [f"{ratio(rows, i, theirs, c):.2f}x {label}" if label else "" for c in (0, 1)]
            print(f"| {name} | {row.label} | {speed(row, tokens, 0)} | {speed(row, tokens, 1)} | {row.warmup_s:.0f} | "
                  f"{' | '.join(ratios)} |", flush=True)
    return 0


def train_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    run_main(main)
