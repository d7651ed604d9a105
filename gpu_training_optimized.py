"""
Train a Llama-style model on one GPU, or on a CPU: the main job.

    python gpu_training_optimized.py                        # a preset for this machine, the built-in corpus
    python gpu_training_optimized.py --preset=rtx4070ti --dataset=my_corpus.txt
    python gpu_training_optimized.py --resume=auto          # continue the run in OUT_DIR exactly where it was
    python gpu_training_optimized.py --model=tiny --max_steps=200 --compile=false   # a smoke test, tiny model

With no arguments on a CPU it trains the `small` model on the built-in corpus for a 6-minute budget (planned again
at every step: schedule.py), then prints a sample and where the model is. On a GPU it takes the hardware preset
sized for the GPU's memory. A preset fills in only what you did not give, and only what fits it (with a note).
The file reads top to bottom: settings, hardware presets, setup, the training step, evaluation, checkpoints,
monitoring, then main() with the loop.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import prepare_data
from checkpoint import (CHECKPOINT_PREFIX, list_checkpoints, load_state_dict, load_weights, read_config)
from cli import (UserError, check_output_path, parse_flags, peak_flops, pick_device, pick_dtype, run_main,
                 settings_block, stop_requests)
from distributed import (World, any_process, from_rank0, gradient_sync, mean_over_processes, rank0_first, replicate,
                         run_torchrun, shard, start_processes)
from modern_llm import LLM, count_params, estimate_training_memory, flops_per_token, model_preset
from monitor import GiB, Monitor
from muon_optimizer import build_optimizer
from schedule import SAMPLE_TOKENS, Schedule, TimeBudget, fit_to_length, run_length
from training_state import (check_same_model, find_resume, prune_checkpoints, resolve_init_from, restore,
                            save_final_model, save_training_checkpoint, trainer_state)

# -----------------------------------------------------------------------------
# Settings (each is a flag: --max_steps=500); a hardware preset fills in the ones not given

MODEL = "small"  # model size (modern_llm.PRESETS): tiny, small, 125m, 730m, 1.5b, 3b
INIT_FROM = ""  # start from trained weights: a Llama folder, a run's OUT_DIR or a hub name (its shape and tokenizer)
TASK = "auto"  # auto (sft for a chat .jsonl with "messages", else pretrain), pretrain, sft (loss on replies only)
PRESET = "auto"  # hardware preset: auto (cpu, or by the GPU's memory), cpu, rtx3060, rtx4070ti, rtx4090, h100
DEVICE = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps
DATASET = "builtin"  # builtin corpus, a local file or folder (.txt .jsonl ...), or a Hugging Face dataset name
TOKENIZER = ""  # empty: train a byte-level BPE on the dataset; else a tokenizer folder or hub name
VOCAB_SIZE = 8192  # vocabulary of the BPE trained here (a pretrained tokenizer keeps its own)
MAX_TOKENS = 0  # read at most this many tokens of the dataset (hub datasets stream only that much); 0 = all
DATA_ROOT = "data"  # prepared token shards are cached here, one folder per dataset and tokenizer
OUT_DIR = "out"  # checkpoint-N folders, metrics.jsonl, loss.png; the final model is saved here too
MAX_STEPS = 2000  # optimizer steps; with MAX_MINUTES an upper bound (0 = none)
MAX_MINUTES = 0.0  # wall-clock budget: > 0 sets the schedule's length from the measured step time
STOP_AFTER = 0  # end this session after this step, with a checkpoint, keeping the full schedule (0 = never)
BATCH_SIZE = 8  # micro-batch: sequences per forward/backward
GRAD_ACCUM = 1  # micro-batches per optimizer step
SEQ_LEN = 256  # tokens per sequence
LR = 1e-3  # peak learning rate (Muon reuses it: its updates are scaled to AdamW's size)
MIN_LR = 1e-4  # learning rate at the end of the schedule
WARMUP_STEPS = 100  # linear warm-up from 0 to LR
SCHEDULE = "cosine"  # cosine, or wsd (warmup-stable-decay: hold LR, then decay linearly over DECAY_FRACTION)
DECAY_FRACTION = 0.2  # wsd: the last share of the steps that decays to MIN_LR
OPTIMIZER = "adamw"  # adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)
WEIGHT_DECAY = 0.1  # decoupled weight decay, on matrices only
GRAD_CLIP = 1.0  # clip the gradient norm to this (0 = off)
DTYPE = "auto"  # auto (bf16 where supported, fp16 + GradScaler on older GPUs, else fp32), bfloat16, float16, float32
COMPILE = True  # torch.compile the model (eager, with a warning, where the platform has no compiler)
COMPILE_MODE = "auto"  # auto (max-autotune on CUDA, default elsewhere), default, reduce-overhead, max-autotune
ACTIVATION_CHECKPOINTING = False  # recompute activations in backward; turned on by itself when that makes it fit
FREEZE_EMBEDDINGS = False  # keep the token embedding (and a tied output head) fixed: no gradient or optimizer state
EVAL_INTERVAL = 200  # evaluate (val loss, perplexity, bits per byte, a sample) every N steps
EVAL_STEPS = 20  # validation batches per evaluation
CHECKPOINT_INTERVAL = 200  # save a checkpoint every N steps
KEEP_CHECKPOINTS = 2  # keep the newest N checkpoints, plus the best by validation loss
RESUME = ""  # auto: continue from the newest checkpoint in OUT_DIR (fresh start if none); or a checkpoint dir
SEED = 1337  # initial weights, batch order and samples
PARALLEL = "auto"  # under torchrun: ddp (a whole model per GPU), fsdp (FSDP2 shards), auto (ddp if it fits)
DIST_TIMEOUT = 600  # under torchrun: seconds a process waits for the others before it stops with an error
LOG_INTERVAL = 50  # print a CPU/RAM/GPU line every N steps
MAX_BAD_STEPS = 3  # NaN/inf losses in a row that are skipped before the run stops at its last checkpoint
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags; the tables below are not

# -----------------------------------------------------------------------------
# Hardware presets: the settings each fills in (explicit flags win), and the memory it is sized for (GiB).
# The training memory each needs is predicted with modern_llm.estimate_training_memory before anything runs.
GPU_RECIPE = dict(schedule="wsd", decay_fraction=0.4)  # the anchors' schedule (see the GPU presets)
HARDWARE = {
    # compile on: on the shared 2-core CPU a compiled step of `small` took 0.66-0.72x the eager one's CPU time
    # (bf16, fused AdamW) and compiling ~60 s, so it pays after ~3 of the 6 minutes (inductor's cache makes
    # later starts quicker); `python speed_optimizations_2025.py vs_transformers` shows both.
    # optimizer muon (Polar Express Newton-Schulz, batched per shape) at lr 3e-3: `python speed_optimizations_2025.py
    # recipe` (2-core EPYC, 1 thread, equal CPU time, 2026-12-04), bits/byte after 90 / 270 CPU s: Muon lr 3e-3
    # 2.409 / 2.192, Muon 2e-3 2.455 / 2.200, Muon at batch 16 2.489 / 2.224, AdamW 2e-3 2.581 / 2.312, AdamW 3e-3
    # 2.545 / 2.371, vocab 4096 (Muon 2e-3) 2.638 / 2.343.
    "cpu": dict(memory_gib=None, model="small", batch_size=8, grad_accum=1, seq_len=256, lr=3e-3, min_lr=3e-4,
                warmup_steps=30, optimizer="muon", max_steps=0, max_minutes=6.0, compile=True, eval_interval=100,
                eval_steps=10, checkpoint_interval=100, log_interval=100),
    # GPU presets: NOT measured here (no GPU run has confirmed them). The schedule (**GPU_RECIPE) follows the
    # anchors' measured recipes at 124M-560M parameters: hold the peak lr, then decay linearly over the last 40%
    # (modded-nanogpt's cooldown_frac=0.4; nanochat's base_train warmdown_ratio is 0.2-0.5). Both also train the
    # hidden matrices with Muon; that is left to --optimizer=muon here until a GPU run confirms it, since it also
    # changes the memory plan (Muon keeps one moment per matrix where AdamW keeps two).
    # Peak learning rates by model size from GPT-3's measured table (Brown et al. 2020, Table 2.1: 125M 6e-4, 760M
    # 2.5e-4, 1.3B 2e-4), decayed to 10% of the peak as there. Their batches (0.5-1M tokens) do not fit one card;
    # each preset's batch is what fits its card (the memory plan), and the 100-step warm-up is this script's
    # default, from no anchor.
    "rtx3060": dict(memory_gib=8, model="125m", vocab_size=32000, batch_size=4, grad_accum=8, seq_len=1024, lr=6e-4,
                    min_lr=6e-5, **GPU_RECIPE),
    # the reference: 730m at seq 384, micro-batch 5 x 8; predicted 11.4 GiB of the 11.5 usable (not yet measured on
    # a GPU): activation checkpointing goes on by itself where less is free (9.7 GiB predicted with it)
    "rtx4070ti": dict(memory_gib=12, model="730m", vocab_size=32000, batch_size=5, grad_accum=8, seq_len=384,
                      lr=2.5e-4, min_lr=2.5e-5, **GPU_RECIPE),
    "rtx4090": dict(memory_gib=24, model="730m", vocab_size=32000, batch_size=16, grad_accum=4, seq_len=384,
                    lr=2.5e-4, min_lr=2.5e-5, **GPU_RECIPE),
    "h100": dict(memory_gib=80, model="1.5b", vocab_size=32000, batch_size=4, grad_accum=8, seq_len=2048, lr=2e-4,
                 min_lr=2e-5, **GPU_RECIPE),
}
# --init_from: defaults for starting from trained weights (flags win; they go before the hardware preset's): a
# learning rate ~10x below pretraining's, so the updates refine what the model knows instead of overwriting it,
# and a short warm-up, since the weights are already in a good region. AdamW, whatever the preset: Muon on
# weights pretrained with AdamW fine-tunes no better than AdamW (Moonshot, "Muon is Scalable for LLM Training").
FINETUNE = dict(lr=5e-5, min_lr=5e-6, warmup_steps=20, optimizer="adamw")
# settings a resumed run does not take from the saved run (checkpoints are the same for any parallelism)
NOT_INHERITED = ("resume", "out_dir", "stop_after", "parallel")


# -----------------------------------------------------------------------------
# Settings: checks, presets, memory, resuming


def validate(cfg: dict) -> None:
    """Every setting checked before anything is read or written, one clear line per mistake."""
    choices = {"task": ("auto", "pretrain", "sft"), "schedule": ("cosine", "wsd"), "optimizer": ("adamw", "muon"),
               "dtype": ("auto", "bfloat16", "float16", "float32"), "parallel": ("auto", "ddp", "fsdp"),
               "compile_mode": ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
    for name, allowed in choices.items():
        if cfg[name] not in allowed:
            raise UserError(f"--{name}={cfg[name]!r} is not one of: {', '.join(allowed)}", "Configuration")
    for name in ("batch_size", "grad_accum", "seq_len", "lr", "dist_timeout", "eval_interval", "eval_steps",
                 "checkpoint_interval", "keep_checkpoints", "log_interval", "max_bad_steps", "vocab_size"):
        if not cfg[name] > 0:  # `not >` also refuses NaN
            raise UserError(f"--{name} must be positive, got {cfg[name]}", "Configuration")
    for name in ("max_steps", "max_minutes", "stop_after", "warmup_steps", "min_lr", "weight_decay", "grad_clip",
                 "max_tokens"):
        if not cfg[name] >= 0:
            raise UserError(f"--{name} must be >= 0, got {cfg[name]}", "Configuration")
    if cfg["max_steps"] == 0 and cfg["max_minutes"] == 0:
        raise UserError("give the run a length: --max_steps=N or --max_minutes=M", "Configuration")
    if cfg["min_lr"] > cfg["lr"]:
        raise UserError(f"--min_lr ({cfg['min_lr']}) is above --lr ({cfg['lr']})", "Configuration")
    if not 0 < cfg["decay_fraction"] <= 1:
        raise UserError(f"--decay_fraction must be in (0, 1], got {cfg['decay_fraction']}", "Configuration")
    model_preset(cfg["model"])  # an unknown size is refused here, not after the data is prepared
    check_output_path(cfg["out_dir"], "--out_dir", beside=True)  # the final model is renamed in from beside it


def fit_settings(cfg: dict, given: set[str], model: str, context: int) -> None:
    """A preset fills in only what fits: a setting the user did not give (typed, or a resumed run's) that does not
    fit one they gave is adapted, with a note saying why. Given settings that cannot run together are an error."""
    if cfg["seq_len"] > context and "seq_len" in given:
        raise UserError(f"--seq_len={cfg['seq_len']} is above the {model} model's maximum of {context}: give "
                        f"--seq_len={context} or less, or a larger --model", "Configuration")
    if cfg["seq_len"] > context:
        print(f"note: --seq_len={context} instead of {cfg['seq_len']}: the {model} model's context is {context}")
        cfg["seq_len"] = context
    for note in fit_to_length(cfg, given, cfg["max_steps"]) if cfg["max_steps"] else []:  # or a budget's cap
        print(note)


def choose_preset(name: str, device: torch.device) -> str:
    """`auto`: cpu off CUDA; on CUDA the largest preset whose memory the GPU has (90%: 12 GB cards report 11.7)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "cpu"
    total = torch.cuda.get_device_properties(device).total_memory / GiB
    fitting = [p for p, s in HARDWARE.items() if s["memory_gib"] and s["memory_gib"] * 0.9 <= total]
    return max(fitting, key=lambda p: HARDWARE[p]["memory_gib"], default="rtx3060")


def apply_preset(cfg: dict, given: set[str], preset: str) -> None:
    for name, value in HARDWARE[preset].items():
        if name in cfg and name not in given:
            cfg[name] = value
    if cfg["max_steps"] == cfg["max_minutes"] == 0 and "max_steps" not in given:  # --max_minutes=0 on the cpu preset
        print(f"note: --max_steps={MAX_STEPS} instead of the {preset} preset's 0: --max_minutes=0 needs a length")
        cfg["max_steps"] = MAX_STEPS


def memory_budget(device: torch.device, preset: str) -> tuple[int, str]:
    """Bytes a run may use: the GPU's memory (capped at the preset's, less ~0.5 GiB of CUDA context), or RAM."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = HARDWARE[preset]["memory_gib"]
        if cap and cap * GiB < total:  # emulate the smaller card the preset is sized for
            torch.cuda.set_per_process_memory_fraction(cap * GiB / total, device)
            total = cap * GiB
        return int(total - 0.5 * GiB), torch.cuda.get_device_name(device)
    import psutil

    return psutil.virtual_memory().total, "this machine's RAM"


def plan_memory(cfg: dict, fixed: set[str], model_cfg, device: torch.device, preset: str,
                dtype: torch.dtype | None, world: World) -> None:
    """Print the predicted peak memory; under torchrun pick DDP, or FSDP where only sharding makes it fit; turn
    activation checkpointing on where that is what makes the run fit (unless the user said no); refuse, naming
    the knobs, a run that cannot fit. Before any data work (a BPE trained here has at most --vocab_size tokens)."""
    def predict(checkpointing: bool) -> dict:
        return estimate_training_memory(model_cfg, cfg["batch_size"], cfg["seq_len"], cfg["optimizer"], checkpointing,
                                        dtype not in (None, torch.float32), world.size, cfg["parallel"] == "fsdp")

    budget, where = memory_budget(device, preset)
    if device.type == "cpu" and world.local_size > 1:  # the processes on one machine share its RAM
        budget, where = budget // world.local_size, f"{where} / {world.local_size} processes"
    if cfg["parallel"] == "auto":  # DDP gathers no weights, so it is faster wherever a whole model fits
        cfg["parallel"] = "ddp"
        if world.size > 1 and predict(True)["total"] > budget:
            cfg["parallel"] = "fsdp"
    if world.size > 1:
        print(f"{world.size} processes, {cfg['parallel']}")
        if cfg["parallel"] == "fsdp" and dtype == torch.float16:
            raise UserError("--parallel=fsdp trains in bf16 or fp32, not fp16: use --dtype=bfloat16 (or float32), "
                            "or --parallel=ddp", "Several GPUs")
    need = predict(cfg["activation_checkpointing"])
    if (need["total"] > budget and not cfg["activation_checkpointing"] and "activation_checkpointing" not in fixed
            and predict(True)["total"] <= budget):
        print(f"activation checkpointing on: without it the run needs {need['total'] / GiB:.1f} GiB")
        cfg["activation_checkpointing"] = True
        need = predict(True)
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items() if k != "total")
    print(f"predicted peak memory {need['total'] / GiB:.2f} GiB of {budget / GiB:.1f} GiB ({where}): {parts}")
    if need["total"] > budget:
        raise UserError(f"this run needs about {need['total'] / GiB:.1f} GiB but {where} has {budget / GiB:.1f} GiB: "
                        "lower --batch_size (raise --grad_accum to keep the tokens per step), lower --seq_len, "
                        "set --activation_checkpointing=true, use --optimizer=muon, or a smaller --model",
                        "Out of memory")


# -----------------------------------------------------------------------------
# Starting from a pretrained model (--init_from) and chat fine-tuning (--task=sft)


def finetune_defaults(cfg: dict, fixed: set[str], typed: set[str]) -> None:
    """--init_from: FINETUNE's settings where no flag (or resumed run) set them. The model's shape comes from the
    checkpoint, so a --model flag beside it is a mistake rather than something to ignore silently."""
    if not cfg["init_from"]:
        return
    if "model" in typed:
        raise UserError("--model and --init_from both given: with --init_from the model's shape comes from that "
                        "checkpoint; drop --model", "Fine-tuning")
    for name, value in FINETUNE.items():
        if name not in fixed:
            cfg[name] = value
            fixed.add(name)


def prepare_dataset(cfg: dict, init: Path | None) -> Path:
    """Token shards, or chat data for SFT (--task=sft, or auto with a .jsonl whose lines have "messages"),
    tokenized with --tokenizer, else --init_from's tokenizer, else a BPE trained here on the data."""
    tokenizer = cfg["tokenizer"] or (str(init) if init else None)
    chat = bool(prepare_data.chat_files(cfg["dataset"]))
    if cfg["task"] == "sft" and not chat:
        raise UserError(f"--task=sft needs chat data: {cfg['dataset']} is not a .jsonl file (or folder of them) with "
                        "a \"messages\" list on every line", "Chat data")
    if cfg["task"] == "pretrain" or not chat:
        return prepare_data.prepare(cfg["dataset"], cfg["data_root"], cfg["vocab_size"], tokenizer,
                                    max_tokens=cfg["max_tokens"] or None)
    print("chat data: fine-tuning with the loss on the assistant's tokens only (SFT)")
    return prepare_data.prepare_chat(cfg["dataset"], cfg["data_root"], cfg["vocab_size"], tokenizer)


def pretrained_config(init: Path, meta: dict):
    """The --init_from checkpoint's model shape, checked against the tokenizer the data was tokenized with."""
    model_cfg = read_config(init)
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {meta['vocab_size']:,} tokens but the --init_from model's embedding has "
                        f"{model_cfg.vocab_size:,}: use the model's own tokenizer (drop --tokenizer)", "Fine-tuning")
    return model_cfg


# -----------------------------------------------------------------------------
# Model and its compilation


def build_model(model_cfg, device: torch.device, cfg: dict, init_state: dict | None = None) -> LLM:
    """The model with its initial weights (seeded, or --init_from's), on the device. A resumed run then loads its
    weights."""
    torch.manual_seed(cfg["seed"])
    model = LLM(model_cfg).to(device)
    if init_state is not None:
        load_weights(model, init_state, cfg["init_from"])
    model.model.embed_tokens.weight.requires_grad_(not cfg["freeze_embeddings"])  # the optimizer skips it if frozen
    model.activation_checkpointing = cfg["activation_checkpointing"]
    return model


def compile_model(model: LLM, cfg: dict, device: torch.device):
    """torch.compile, or the model itself (with a warning) where the platform cannot compile. The uncompiled
    module is still used for evaluation, samples and saving, so checkpoints have no `_orig_mod.` prefixes."""
    if not cfg["compile"]:
        return model
    from torch.utils._triton import has_triton

    if device.type == "cuda" and not has_triton():
        print("warning: torch.compile needs Triton on CUDA (pip install triton; on Windows triton-windows): "
              "training eager")
        return model
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++", "cl")):
        print("warning: torch.compile needs a C++ compiler on CPU (g++, clang++ or MSVC): training eager")
        return model
    mode = cfg["compile_mode"]
    if mode == "auto":
        mode = "max-autotune" if device.type == "cuda" else "default"
    torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager with a warning
    return torch.compile(model, mode=None if mode == "default" else mode)


def fused_adamw(device: torch.device, sharded: bool) -> bool:
    """Fused AdamW (one kernel over all tensors) on CUDA, and on CPU too, where it ran the optimizer step ~2.5x
    faster than foreach (speed_optimizations_2025.py, fused-adamw row); FSDP's sharded CPU tensors keep foreach."""
    return device.type == "cuda" or (device.type == "cpu" and not sharded)


# -----------------------------------------------------------------------------
# One optimizer step


def train_step(model, optimizer, scaler: torch.amp.GradScaler, micro_batches: list, autocast,
               grad_clip: float) -> tuple[float, float] | None:
    """Forward/backward over the micro-batches, then one clipped update. Each micro-batch's loss is divided by
    their number, so the summed gradient is the mean over all of them: 2 x 4 updates as 8 x 1 does.
    Returns (loss, gradient norm), or None when the loss or the gradient was not finite and the update was
    skipped (with fp16, GradScaler skips inf gradients by itself and lowers its scale)."""
    loss_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast:
                loss = model(x, y) / len(micro_batches)
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach().float()  # stays on the device: one sync per step, below
    loss_sum = mean_over_processes(loss_sum)  # every process then takes the same decision below
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the norm over every shard
    loss_sum, norm = torch.stack([loss_sum.float(), norm.float()]).tolist()  # the step's one host sync
    finite = math.isfinite(loss_sum) and (scaler.is_enabled() or math.isfinite(norm))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return (loss_sum, norm) if finite else None


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: LLM, loader, steps: int, autocast, device, bytes_per_token: float) -> dict:
    """Mean validation loss over the same `steps` batches every time, so evaluations compare; perplexity; and
    bits per byte, which compares across tokenizers (the loss is per token, tokens differ in bytes)."""
    model.eval()
    total = 0.0
    for i in range(steps):
        x, y = loader.get_batch(i, 0, device)
        with autocast:
            total += model(x, y).item()
    model.train()
    loss = float(mean_over_processes(torch.tensor(total / steps, device=device)))  # each process had its own rows
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


def sample(model: LLM, tokenizer, start_id: int, tokens: int, autocast, device, seed: int) -> str:
    """A short sample from a document boundary, on its own RNG so sampling never changes training."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = min(tokens, model.cfg.max_seq_len - 1)
    with autocast:
        out = model.generate(torch.tensor([[start_id]], device=device), tokens, temperature=0.8, top_k=50,
                             generator=g)
    model.train()
    return tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True)


# -----------------------------------------------------------------------------
# Setup, in the order main() runs it


def settle_settings(cfg: dict, typed: set[str]) -> tuple[Path | None, dict, set[str]]:
    """The run's settings, all checked before anything is read or written. Returns the checkpoint to resume (or
    None), its trainer state, and the names a hardware preset must not fill in: those typed on the command
    line, those a resumed run keeps from its own settings, and the fine-tuning defaults of --init_from."""
    resume = find_resume(cfg)
    saved = trainer_state(resume) if resume else {}
    fixed = set(typed)
    for name, value in saved.get("config", {}).items():  # a resumed run keeps its settings unless given again
        if name in cfg and name not in typed and name not in NOT_INHERITED:
            cfg[name] = value
            fixed.add(name)
    if cfg["preset"] not in ("auto", *HARDWARE):
        raise UserError(f"--preset={cfg['preset']!r} is not one of: auto, {', '.join(HARDWARE)}", "Hardware presets")
    finetune_defaults(cfg, fixed, typed)
    return resume, saved, fixed


def load_data(cfg: dict, world: World, init: Path | None) -> tuple[dict, Any, Any, Any]:
    """The prepared token shards (tokenized once, by rank 0 first), their meta, both loaders and the tokenizer."""
    data_dir = rank0_first(world, lambda: prepare_dataset(cfg, init))
    meta = prepare_data.load_meta(data_dir)
    loaders = [prepare_data.batch_loader(data_dir, split, cfg["batch_size"], cfg["seq_len"], cfg["seed"],
                                         world.rank, world.size) for split in ("train", "val")]
    return meta, *loaders, prepare_data.load_tokenizer(meta["tokenizer_dir"])


def wrap_for_training(model: LLM, cfg: dict, world: World, device: torch.device, dtype: torch.dtype):
    """The module to train: FSDP2 shards (in place, so build the optimizer after this), then compiled, then
    DDP's whole-model replica. The unwrapped `model` stays the one evaluated, sampled and saved."""
    if world.size > 1 and cfg["parallel"] == "fsdp":
        shard(model, dtype if dtype != torch.float32 else None)
    train_model = compile_model(model, cfg, device)
    if world.size > 1 and cfg["parallel"] == "ddp":
        train_model = replicate(train_model, device)
    return train_model


@dataclass
class Run:
    """What the loop needs, built once by setup()."""

    cfg: dict
    device: torch.device
    world: World
    out: Path
    model: LLM  # evaluated, sampled and saved
    train_model: torch.nn.Module  # the same weights, compiled and/or wrapped by DDP: what trains
    optimizer: Any
    scaler: torch.amp.GradScaler
    autocast: Any  # the autocast context (disabled in fp32)
    train_data: Any
    val_data: Any
    tokenizer: Any
    token_ids: dict
    start_step: int
    best: float | None  # best validation loss so far
    last_saved: Path | None
    tokens_per_step: int
    global_batch: int
    flops_per_step: float
    peak_flops: float | None
    bytes_per_token: float
    task: str  # "sft" (chat data) or "pretrain", recorded beside each checkpoint for serve.py's chat page
    schedule: Schedule | None = None  # its length is the step the run ends at (None: a budget not measured yet)
    budget: TimeBudget | None = None  # --max_minutes: plans the length again at every step
    given: set[str] = field(default_factory=set)  # typed or the resumed run's: a budget adapts only the others


def setup(cfg: dict, resume: Path | None, saved: dict, init: Path | None, device: torch.device, world: World,
          preset: str, dtype: torch.dtype) -> Run:
    """Data and the model's shape (checked before OUT_DIR is touched), then the model, its weights (initial,
    --init_from's or the resumed run's), the optimizer and the state a resumed run continues from."""
    init_state = load_state_dict(init) if init and not resume else None  # a missing shard stops us here
    meta, train_data, val_data, tokenizer = load_data(cfg, world, init)
    model_cfg = pretrained_config(init, meta) if init else model_preset(cfg["model"], vocab_size=meta["vocab_size"])
    if resume:
        check_same_model(resume, model_cfg)

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fp32 matmuls on tensor cores, ~10 mantissa bits
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f".{CHECKPOINT_PREFIX}*"):  # half-written or half-deleted by a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    model = build_model(model_cfg, device, cfg, init_state)
    del init_state  # the model holds the weights now
    if resume:
        load_weights(model, load_state_dict(resume), str(resume))  # before the model is split across processes
    train_model = wrap_for_training(model, cfg, world, device, dtype)
    optimizer = build_optimizer(model, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                fused=fused_adamw(device, world.size > 1 and cfg["parallel"] == "fsdp"))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step = saved.get("global_step", 0)
    if resume:
        restore(resume, model, optimizer, scaler)
        print(f"resuming from {resume} at step {start_step}")

    global_batch = cfg["batch_size"] * cfg["grad_accum"] * world.size  # sequences per optimizer step
    tokens_per_step = global_batch * cfg["seq_len"]
    if saved.get("global_batch", global_batch) != global_batch:  # e.g. resumed on another number of GPUs
        print(f"note: the global batch was {saved['global_batch']} sequences and is now {global_batch}: to keep it, "
              "give --batch_size or --grad_accum (see README: Several GPUs)")
    precision = "bf16" if dtype != torch.float32 else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    peak = peak_flops(device, precision)[0] if device.type in ("cuda", "cpu") else None  # of one GPU or process
    run = Run(cfg=cfg, device=device, world=world, out=out, model=model, train_model=train_model,
              optimizer=optimizer, scaler=scaler,
              autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
              train_data=train_data, val_data=val_data, tokenizer=tokenizer,
              token_ids={"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
                         "pad_id": tokenizer.pad_token_id},
              start_step=start_step, best=saved.get("best_val_loss"), last_saved=resume,
              tokens_per_step=tokens_per_step, global_batch=global_batch,
              flops_per_step=flops_per_token(model_cfg, cfg["seq_len"]) * tokens_per_step, peak_flops=peak,
              # chat data: bytes per token the loss is on (the assistant's)
              bytes_per_token=(meta.get("val_target_bytes", meta["val_bytes"])
                               / meta.get("val_target_tokens", meta["val_tokens"])),
              task=meta.get("task", "pretrain"))
    print(f"{cfg['init_from'] or cfg['model']} model, {count_params(model_cfg) / 1e6:.1f}M parameters | "
          f"preset {preset} | {device} {str(dtype).removeprefix('torch.')} | {cfg['optimizer']} | compile "
          f"{getattr(train_model, 'module', train_model) is not model} | "
          f"activation checkpointing {cfg['activation_checkpointing']} | "
          f"{tokens_per_step:,} tokens/step (global batch {global_batch} = micro-batch {cfg['batch_size']} x "
          f"accumulation {cfg['grad_accum']} x {world.size} processes, of {cfg['seq_len']} tokens) | "
          f"data {meta['data_dir']}")
    return run


# -----------------------------------------------------------------------------
# The loop


def ending(run: Run, step: int, stop: list) -> str | None:
    """Why this session ends at `step`, or None to go on: "finished" (the schedule is done), the name of the
    signal that asked to stop (on any process, so all stop at the same step), or "stop_after"."""
    if run.schedule.length is not None and step >= run.schedule.length:
        return "finished"
    if any_process(bool(stop), run.device):
        return stop[0] if stop else "SIGTERM"
    if 0 < run.cfg["stop_after"] <= step:
        return "stop_after"
    return None


def evaluate_and_show(run: Run, step: int, monitor: Monitor) -> dict:
    result = evaluate(run.model, run.val_data, run.cfg["eval_steps"], run.autocast, run.device, run.bytes_per_token)
    run.best = result["val_loss"] if run.best is None else min(run.best, result["val_loss"])
    t = time.time()
    text = sample(run.model, run.tokenizer, run.token_ids["eos_id"], SAMPLE_TOKENS[0], run.autocast, run.device,
                  run.cfg["seed"] + step)
    timed(run.budget, "sample", t)  # the final, longer sample is planned from it
    monitor.evaluation(step, result, text)
    return result


def save(run: Run, step: int, val_loss: float | None) -> None:
    record = {"global_step": step, "max_steps": run.schedule.length, "lr_progress": run.schedule.progress,
              "budget_left_s": run.budget.deadline - time.time() if run.budget else None, "best_val_loss": run.best,
              "val_loss": val_loss, "tokens_seen": step * run.tokens_per_step, "global_batch": run.global_batch,
              "task": run.task,
              "config": run.cfg}
    run.last_saved = save_training_checkpoint(run.out, step, run.model, run.optimizer, run.scaler, run.tokenizer,
                                              record, run.token_ids)
    if run.world.rank == 0:
        prune_checkpoints(run.out, run.cfg["keep_checkpoints"])


def one_step(run: Run, step: int) -> tuple[tuple[float, float] | None, float]:
    """One optimizer step at the schedule's learning rate, on the micro-batches of (seed, step): (loss, gradient
    norm) or None if it was skipped as non-finite, and the seconds it took."""
    cfg = run.cfg
    factor = run.schedule.factor(step)  # once a step: each call moves the decay on
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    t = time.time()
    try:
        micro = [run.train_data.get_batch(step, m, run.device) for m in range(cfg["grad_accum"])]
        result = train_step(run.train_model, run.optimizer, run.scaler, micro, run.autocast, cfg["grad_clip"])
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)  # so that the time is the step's, not the time to queue it
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory at step {step}: lower --batch_size (raise --grad_accum to keep the "
                        "tokens per step), lower --seq_len, set --activation_checkpointing=true or use "
                        f"--optimizer=muon; the last checkpoint is {run.last_saved}", "Out of memory") from None
    return result, time.time() - t


def timed(budget: TimeBudget | None, what: str, since: float) -> float:
    """Tell a time budget what took the seconds since `since`; returns them."""
    seconds = time.time() - since
    if budget:
        budget.timed(what, seconds)
    return seconds


def replan(run: Run, step: int, monitor: Monitor) -> None:
    """A time budget's length planned again from the time left (rank 0's plan for every process), and a warm-up
    the user did not give cut to fit it."""
    cfg, schedule = run.cfg, run.schedule
    end = from_rank0(run.budget.plan(step, cfg["max_steps"] or None), run.device)
    if end is None or end == schedule.length:
        return
    spent = end <= step  # before the step time was measured: the final evaluation would overrun the budget
    if not spent and (schedule.length is None or schedule.length == cfg["max_steps"]):  # the first measured plan
        monitor.bar.write(f"the budget allows about {end} steps (planned again at every step)")
    schedule.length = monitor.bar.total = end
    for note in [] if spent else fit_to_length(cfg, run.given, end, step):
        monitor.bar.write(note)


def train(run: Run, monitor: Monitor, stop: list) -> tuple[str, int, dict | None]:
    """plan -> evaluate -> save -> stop? -> one step -> log, until the session ends. Returns why it ended (see
    ending()), the step it ended at and the last evaluation."""
    cfg, budget = run.cfg, run.budget
    step, bad, last_eval, eval_step = run.start_step, 0, None, None
    t_start = time.time()
    while True:
        t_iteration, planned_apart = time.time(), 0.0  # a step's time: its iteration less evaluation and save
        if budget:
            replan(run, step, monitor)
        end = ending(run, step, stop)
        # Evaluate every EVAL_INTERVAL steps and at the end. A resumed run was evaluated at its first step
        # before that checkpoint was saved; a fresh one has not been, so step 0 is evaluated.
        if end == "finished" or (step % cfg["eval_interval"] == 0 and (step != run.start_step or step == 0)):
            t = time.time()
            last_eval, eval_step = evaluate_and_show(run, step, monitor), step
            planned_apart += timed(budget, "eval", t)
        # Save every CHECKPOINT_INTERVAL steps and whenever the session ends; not the step resumed from (it is
        # saved already), nor right after a skipped non-finite step.
        if step != run.start_step and bad == 0 and (end or step % cfg["checkpoint_interval"] == 0):
            t = time.time()
            save(run, step, last_eval["val_loss"] if eval_step == step else None)
            planned_apart += timed(budget, "save", t)
        if end == "finished":
            save_final_model(run.out, run.model, run.tokenizer, run.token_ids, step, run.best, run.task)
        if end:
            return end, step, last_eval
        result, dt = one_step(run, step)
        step += 1

        # A non-finite loss or gradient skipped the update; a few in a row stop the run at its last checkpoint.
        if result is None:
            bad += 1
            monitor.log({"step": step, "skipped": "non-finite loss or gradient"})
            if bad >= cfg["max_bad_steps"]:
                where = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint yet"
                raise UserError(f"the loss was NaN/inf {bad} steps in a row (step {step}): stopped without saving; "
                                f"{where}. Lower --lr, raise --warmup_steps or use --dtype=bfloat16, then "
                                "--resume=auto", "Loss is NaN or inf")
        else:
            bad = 0
            mfu = run.flops_per_step / dt / (run.peak_flops * run.world.size) if run.peak_flops else None
            monitor.train_step({"step": step, "loss": result[0], "lr": run.optimizer.param_groups[0]["lr"],
                                "grad_norm": result[1], "tokens_per_s": run.tokens_per_step / dt, "mfu": mfu,
                                "elapsed_s": time.time() - t_start}, run.device, cfg["log_interval"])
        timed(budget, "step", t_iteration + planned_apart)  # the seconds since then, less those planned apart


def report(run: Run, end: str, step: int, last_eval: dict | None, seconds: float, started: float) -> int:
    """What the session did and where the model is; the exit code (130/143 when a signal stopped it)."""
    if end == "finished":
        trained = (step - run.start_step) * run.tokens_per_step
        print(f"\ndone: {step} steps, val loss {last_eval['val_loss']:.4f} (perplexity {last_eval['val_ppl']:.1f}, "
              f"{last_eval['val_bpb']:.3f} bits/byte), {seconds / 60:.1f} min, {trained / seconds:,.0f} tokens/s")
        text = sample(run.model, run.tokenizer, run.token_ids["eos_id"], SAMPLE_TOKENS[1], run.autocast, run.device,
                      run.cfg["seed"])
        print(f"sample:\n{text}\n")
        print(f"model saved to {run.out}/ (checkpoints: {', '.join(p.name for p in list_checkpoints(run.out))}); "
              f"try:\n  python text_generator.py --checkpoint={run.out}")
        if run.budget:
            print(f"time budget {run.budget.seconds:.1f} s, used {time.time() - started:.1f} s from the start")
        return 0
    if end == "stop_after":
        print(f"stopped after step {step} (--stop_after): saved {run.last_saved}; continue with --resume=auto")
        return 0
    print(f"stopped by {end} at step {step}: saved {run.last_saved}; continue with --resume=auto")
    return 130 if end == "SIGINT" else 143


# -----------------------------------------------------------------------------
# main


def main(argv: list[str]) -> int:
    started = time.time()  # a time budget counts from here: data, set-up, training, the final evaluation and save
    cfg, typed = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    resume, saved, fixed = settle_settings(cfg, typed)
    given = typed | (set(saved.get("config", {})) - set(NOT_INHERITED))
    device = pick_device(cfg["device"])
    preset = choose_preset(cfg["preset"], device)
    apply_preset(cfg, fixed, preset)
    validate(cfg)
    init = resolve_init_from(cfg["init_from"]) if cfg["init_from"] else None
    shape = read_config(resume or init) if resume or init else model_preset(cfg["model"], vocab_size=cfg["vocab_size"])
    fit_settings(cfg, given, cfg["init_from"] or cfg["model"], shape.max_seq_len)
    dtype = pick_dtype(cfg["dtype"], device)
    device, world = start_processes(device, cfg["dist_timeout"])
    plan_memory(cfg, fixed, shape, device, preset, dtype, world)
    run = setup(cfg, resume, saved, init, device, world, preset, dtype)
    run.schedule, run.budget = run_length(cfg, typed, bool(resume), saved, count_params(run.model.cfg), started)
    run.given = given

    monitor = Monitor(run.out, run.start_step, run.schedule.length, enabled=world.rank == 0)
    t_start = time.time()
    try:
        with stop_requests() as stop:
            end, step, last_eval = train(run, monitor, stop)
    finally:
        monitor.close()
    return report(run, end, step, last_eval, time.time() - t_start, started)


if __name__ == "__main__":
    (run_torchrun if "WORLD_SIZE" in os.environ else run_main)(main)
