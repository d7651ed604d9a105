"""
Train a Llama-style model on one GPU, or on a CPU: the main job.

    python gpu_training_optimized.py                        # a preset for this machine, the built-in corpus
    python gpu_training_optimized.py --preset=rtx4070ti --dataset=my_corpus.txt
    python gpu_training_optimized.py --resume=auto          # continue the run in OUT_DIR exactly where it was
    python gpu_training_optimized.py --model=tiny --max_steps=200 --compile=false   # a one-minute smoke test

With no arguments on a CPU it trains the `small` model on the built-in corpus for a few minutes, then prints
a sample and where the model is. On a GPU it takes the hardware preset sized for the GPU's memory.
The file reads top to bottom: settings, hardware presets, setup, the training step, evaluation, checkpoints,
monitoring, then main() with the loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import modern_llm
import prepare_data
from modern_llm import (CheckpointError, LLM, UserError, estimate_training_memory,
                        flops_per_token, count_params, is_complete_checkpoint, list_checkpoints, load_state_dict,
                        load_weights, model_preset, parse_flags, pick_device, read_config, resolve_checkpoint, run_main,
                        save_checkpoint, script_constants)
from muon_optimizer import build_optimizer

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
_FLAG_DEFAULTS = script_constants(globals())  # taken here: the tables below are not flags

# Hardware presets: the settings each fills in (explicit flags win), and the memory it is sized for (GiB).
# The training memory each needs is predicted with modern_llm.estimate_training_memory before anything runs.
HARDWARE = {
    # compile off: on our 2-core CPU it gains ~9% (NOTES.md) but costs ~30 s cold, a wash in a 6-minute run
    "cpu": dict(memory_gib=None, model="small", batch_size=8, grad_accum=1, seq_len=256, lr=2e-3, min_lr=2e-4,
                warmup_steps=30, max_steps=0, max_minutes=6.0, compile=False, eval_interval=100, eval_steps=10,
                checkpoint_interval=100, log_interval=100),
    "rtx3060": dict(memory_gib=8, model="125m", vocab_size=32000, batch_size=4, grad_accum=8, seq_len=1024, lr=6e-4,
                    min_lr=6e-5),
    # the reference: 730m at seq 384, micro-batch 5 x 8; predicted 13 GiB, so activation checkpointing goes on
    "rtx4070ti": dict(memory_gib=12, model="730m", vocab_size=32000, batch_size=5, grad_accum=8, seq_len=384,
                      lr=3e-4, min_lr=3e-5),
    "rtx4090": dict(memory_gib=24, model="730m", vocab_size=32000, batch_size=16, grad_accum=4, seq_len=384,
                    lr=3e-4, min_lr=3e-5),
    "h100": dict(memory_gib=80, model="1.5b", vocab_size=32000, batch_size=4, grad_accum=8, seq_len=2048, lr=3e-4,
                 min_lr=3e-5),
}
# --init_from: defaults for starting from trained weights (flags win; they go before the hardware preset's): a
# learning rate ~10x below pretraining's, so the updates refine what the model knows instead of overwriting it,
# and a short warm-up, since the weights are already in a good region.
FINETUNE = dict(lr=5e-5, min_lr=5e-6, warmup_steps=20)
TRAINING_STATE = "training_state.pt"  # optimizer, GradScaler and RNG states, beside a checkpoint's weights
# settings a resumed run does not take from the saved run (checkpoints are the same for any parallelism)
NOT_INHERITED = ("resume", "out_dir", "stop_after", "parallel")
FAULT_ENV = "TRAIN_FAULT"  # tests only: "exit" or "hang" makes the last torchrun rank do so at step 2
GiB = 2**30

# -----------------------------------------------------------------------------
# Setup: flags, device, precision, memory


def validate(cfg: dict) -> None:
    """Every setting checked before anything is read or written, one clear line per mistake."""
    choices = {"schedule": ("cosine", "wsd"), "optimizer": ("adamw", "muon"),
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


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at ~2-4x fp32 (NOTES.md: 2.7x training speed here); without them
    bf16 is emulated and slower than fp32. (torch.cpu's probes are private, so absent ones count as no.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). Weights, gradients and optimizer state stay fp32 either way."""
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        else:
            name = "bfloat16" if device.type == "cpu" and cpu_has_bf16() else "float32"
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("this GPU has no bf16: use --dtype=float16 (loss scaling is automatic) or --dtype=float32",
                        "bf16 is not supported")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def plan_memory(cfg: dict, given: set[str], model_cfg, device: torch.device, preset: str,
                autocast: torch.dtype | None, world: World) -> None:
    """Print the predicted peak memory; under torchrun pick DDP, or FSDP where only sharding makes it fit; turn
    activation checkpointing on where that is what makes the run fit (unless the user said no); refuse, naming
    the knobs, a run that cannot fit."""
    def predict(checkpointing: bool) -> dict:
        return estimate_training_memory(model_cfg, cfg["batch_size"], cfg["seq_len"], cfg["optimizer"],
                                        checkpointing, autocast is not None, world.size, cfg["parallel"] == "fsdp")

    budget, where = memory_budget(device, preset)
    if device.type == "cpu" and world.local_size > 1:  # the processes on one machine share its RAM
        budget, where = budget // world.local_size, f"{where} / {world.local_size} processes"
    if cfg["parallel"] == "auto":  # DDP gathers no weights, so it is faster wherever a whole model fits
        cfg["parallel"] = "ddp"
        if world.size > 1 and predict(True)["total"] > budget:
            cfg["parallel"] = "fsdp"
    if world.size > 1:
        print(f"{world.size} processes, {cfg['parallel']}")
        if cfg["parallel"] == "fsdp" and autocast == torch.float16:
            raise UserError("--parallel=fsdp trains in bf16 or fp32, not fp16: use --dtype=bfloat16 (or float32), "
                            "or --parallel=ddp", "Several GPUs")
    need = predict(cfg["activation_checkpointing"])
    if (need["total"] > budget and not cfg["activation_checkpointing"] and "activation_checkpointing" not in given
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


def find_resume(cfg: dict) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run never overwrites another run."""
    out = Path(cfg["out_dir"])
    existing = list_checkpoints(out) if out.is_dir() else []
    if cfg["resume"] == "auto":
        return existing[-1] if existing else None
    if cfg["resume"]:
        found = list_checkpoints(cfg["resume"]) if Path(cfg["resume"]).is_dir() else []
        path = found[-1] if found else resolve_checkpoint(cfg["resume"])
        if not (path / TRAINING_STATE).is_file() or not (path / modern_llm.STATE_FILE).is_file():
            raise UserError(f"--resume={cfg['resume']}: {path} holds no training state ({TRAINING_STATE}); only "
                            "checkpoints written by this script can be resumed", "Resuming a run")
        return path
    if existing or is_complete_checkpoint(out):
        raise UserError(f"{out} already holds a training run: continue it with --resume=auto, or start a new one "
                        "with another --out_dir", "Resuming a run")
    return None


def trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / modern_llm.STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / modern_llm.STATE_FILE} is unreadable ({e})") from None


def check_same_model(path: Path, model_cfg) -> None:
    saved = read_config(path)
    if saved != model_cfg:
        def shape(c):
            return f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head}/{c.n_kv_head} heads, vocab {c.vocab_size}"
        raise UserError(f"--resume: {path} holds another model ({shape(saved)}) than this run builds "
                        f"({shape(model_cfg)}): resume with that run's --model and tokenizer, or start a new run "
                        "in another --out_dir", "Resuming a run")


# -----------------------------------------------------------------------------
# Starting from a pretrained model (--init_from) and chat fine-tuning (--task=sft)


def finetune_defaults(cfg: dict, given: set[str], typed: set[str]) -> None:
    """--init_from: FINETUNE's settings where no flag (or resumed run) set them. The model's shape comes from the
    checkpoint, so a --model flag beside it is a mistake rather than something to ignore silently."""
    if not cfg["init_from"]:
        return
    if "model" in typed:
        raise UserError("--model and --init_from both given: with --init_from the model's shape comes from that "
                        "checkpoint; drop --model", "Fine-tuning")
    for name, value in FINETUNE.items():
        if name not in given:
            cfg[name] = value
            given.add(name)


def resolve_init_from(name: str) -> Path:
    """A local Llama folder or an earlier run's OUT_DIR (its newest checkpoint), else a hub model downloaded once
    into the Hugging Face cache (config, safetensors and tokenizer files only)."""
    path = Path(name).expanduser()
    if not path.exists() and not prepare_data.looks_like_path(name):
        path = download_model(name)
    path = resolve_checkpoint(path)
    read_config(path)  # refuses, naming the field, what our model cannot represent: before any work on data
    if modern_llm.read_quantization(path):
        raise UserError(f"--init_from={name}: an int8 checkpoint cannot be trained; start from the floating-point "
                        "one it was exported from", "Fine-tuning")
    return path


def download_model(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except LocalEntryNotFoundError:
        raise UserError(f"--init_from={name!r} is not a local folder and the Hugging Face hub cannot be reached to "
                        f"download it (offline?): download it where there is a network (hf download {name} "
                        "--local-dir DIR) and pass --init_from=DIR", "Fine-tuning") from None
    except (HFValidationError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--init_from={name!r} is neither a local folder nor a model the Hugging Face hub gives "
                        f"(a gated model needs `hf auth login`): {first}", "Fine-tuning") from None


def prepare_dataset(cfg: dict, init: Path | None) -> Path:
    """Token shards, or chat data for SFT (--task=sft, or auto with a .jsonl whose lines have "messages"),
    tokenized with --tokenizer, else --init_from's tokenizer, else a BPE trained here on the data."""
    if cfg["task"] not in ("auto", "pretrain", "sft"):
        raise UserError(f"--task={cfg['task']!r} is not one of: auto, pretrain, sft", "Configuration")
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
# Model, optimizer, schedule


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


def lr_factor(step: int, cfg: dict, max_steps: int | None) -> float:
    """Learning rate / LR at `step`: linear warm-up, then cosine or warmup-stable-decay down to MIN_LR.
    Before a time-budgeted run knows its length (max_steps None) it holds the peak."""
    warmup, floor = cfg["warmup_steps"], cfg["min_lr"] / cfg["lr"]
    if step < warmup:
        return (step + 1) / warmup
    if max_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if cfg["schedule"] == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    stable = 1 - cfg["decay_fraction"]
    return 1.0 if progress < stable else 1 - (1 - floor) * (progress - stable) / cfg["decay_fraction"]


def plan_steps(step: int, seconds_per_step: float, seconds_left: float, eval_seconds: float, cfg: dict) -> int:
    """The schedule's length that spends the time left: steps, plus the evaluations among them and the final one."""
    per_step = seconds_per_step + eval_seconds / cfg["eval_interval"]
    planned = step + max(1, int((seconds_left - eval_seconds) / per_step))
    return min(planned, cfg["max_steps"]) if cfg["max_steps"] else planned


class TimeBudget:
    """A --max_minutes run's length: unknown until the step time is measured over 5 steps after the first two
    (they include compilation); then fixed, so the learning rate reaches MIN_LR as the time runs out."""

    def __init__(self, minutes: float, start_step: int):
        self.deadline = time.time() + 60 * minutes
        self.start_step = start_step
        self.mark: tuple[float, int] | None = None  # (time, step) from which the step time is measured

    def plan(self, step: int, eval_seconds: float, cfg: dict) -> int | None:
        if self.mark is None:
            if step >= self.start_step + 2:
                self.mark = (time.time(), step)
            return None
        if step < self.mark[1] + 5:
            return None
        per_step = (time.time() - self.mark[0]) / (step - self.mark[1])
        return plan_steps(step, per_step, self.deadline - time.time(), eval_seconds, cfg)


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
    loss_sum = float(mean_over_processes(loss_sum))  # every process then takes the same decision below
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the norm over every shard
    finite = math.isfinite(loss_sum) and (scaler.is_enabled() or math.isfinite(norm.item()))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return (loss_sum, norm.item()) if finite else None


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
# Checkpoints: Hugging Face directories plus the training state


def remove_dir(path: Path) -> None:
    """Rename first, then delete: a kill mid-way leaves a hidden leftover, never a half-deleted checkpoint."""
    trash = path.with_name(f".{path.name}.deleting")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save_training_checkpoint(out: Path, step: int, model: LLM, optimizer, scaler, tokenizer, record: dict,
                             token_ids: dict) -> Path:
    """OUT_DIR/checkpoint-<step>: weights, config and tokenizer (loadable by transformers as it is), plus
    trainer_state.json and the optimizer, GradScaler and RNG states, everything written atomically.
    Under torchrun every process calls this (FSDP2 gathers the shards) and rank 0 writes, once."""
    optimizer_state = whole_optimizer_state(model, optimizer)
    whole = whole_model(model)

    def extra(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer_state, "scaler": scaler.state_dict(), "rng": rng}, tmp / TRAINING_STATE)
        (tmp / modern_llm.STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    path = out / f"{modern_llm.CHECKPOINT_PREFIX}{step}"
    if whole is not None:
        if path.exists():  # only when resuming from an older checkpoint of the same run
            remove_dir(path)
        save_checkpoint(whole, path, extra=extra, token_ids=token_ids)
    wait_for_rank0()  # no process goes on (or resumes) before the files are there
    return path


def save_final_model(out: Path, model: LLM, tokenizer, token_ids: dict, step: int, best: float | None) -> None:
    """The final model at OUT_DIR itself, as the Hugging Face Trainer leaves it: from_pretrained(OUT_DIR) works."""
    def extra(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))
        (tmp / modern_llm.STATE_FILE).write_text(json.dumps({"global_step": step, "best_val_loss": best}) + "\n")

    whole = whole_model(model)
    if whole is not None:
        save_checkpoint(whole, out, extra=extra, token_ids=token_ids)
    wait_for_rank0()


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and the best by validation loss (trainer_state.json's val_loss)."""
    found = list_checkpoints(out)
    scored = [(trainer_state(p).get("val_loss"), p) for p in found]
    scored = [(v, p) for v, p in scored if v is not None and math.isfinite(v)]
    best = min(scored, key=lambda vp: vp[0])[1] if scored else None
    for p in found[:-keep]:
        if p != best:
            remove_dir(p)


def restore(path: Path, model: LLM, optimizer, scaler) -> None:
    """Optimizer, GradScaler and RNG states of a checkpoint (weights_only: no code is unpickled); the weights
    were loaded before the model was split across processes. The optimizer state is keyed by parameter name,
    so it loads into any number of processes, each FSDP2 process taking its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
        parts = optimizer_parts(optimizer)
        if set(state["optimizer"]) != set(parts):
            raise ValueError(f"it holds the state of {' + '.join(state['optimizer'])}, this run uses "
                             f"{' + '.join(parts)}")
        for name, part in parts.items():
            set_optimizer_state_dict(model, part, state["optimizer"][name],
                                     options=StateDictOptions(full_state_dict=True))
        scaler.load_state_dict(state["scaler"])
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--resume: {path / TRAINING_STATE} does not load into this run's optimizer "
                        f"({str(e).splitlines()[0]}): resume with that run's --optimizer", "Resuming a run") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# -----------------------------------------------------------------------------
# Several processes: torchrun, DDP and FSDP2


class World:
    """This process's place in a torchrun job: rank 0 of 1 without torchrun."""

    def __init__(self, rank: int = 0, local_rank: int = 0, size: int = 1, local_size: int = 1):
        self.rank, self.local_rank, self.size, self.local_size = rank, local_rank, size, local_size


def start_processes(device: torch.device, timeout_s: int) -> tuple[torch.device, World]:
    """Under torchrun (RANK and WORLD_SIZE in the environment): one GPU per process (LOCAL_RANK), the process
    group (NCCL on GPUs, gloo on CPUs) whose collectives give up after `timeout_s`, and stdout silenced on every
    rank but 0, so the run prints once (errors, on stderr, still show from any rank). Else: nothing."""
    env = os.environ
    if int(env.get("WORLD_SIZE", 1)) == 1:
        return device, World()
    world = World(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"]))
    if device.type == "mps":
        raise UserError("torchrun needs CUDA GPUs or CPUs; Apple GPUs train in one process", "Several GPUs")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {world.local_size} processes on this machine but it has "
                            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node={torch.cuda.device_count()}",
                            "Several GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    nccl = device.type == "cuda" and dist.is_nccl_available()  # Windows builds have no NCCL: gloo works, slower
    dist.init_process_group("nccl" if nccl else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if nccl else None)
    if world.rank:
        sys.stdout = open(os.devnull, "w")
    return device, world


def in_turn(world: World, work):
    """work() on rank 0 first, then on the first process of each other machine, then on the rest: the data is
    prepared once (or once per machine when they do not share the folder) and then reused, never written by
    two processes at once."""
    turn = 0 if world.rank == 0 else 1 if world.local_rank == 0 else 2
    result = None
    for t in range(3 if world.size > 1 else 1):
        if t == turn:
            result = work()
        wait_for_rank0()
    return result


def parallelize(model: LLM, cfg: dict, world: World, device: torch.device, autocast: torch.dtype | None):
    """The module to train. DDP: a whole model per process, gradients averaged during backward. FSDP2: each
    block's weights, gradients and optimizer state split across the processes and gathered block by block for
    its forward and backward (in bf16, gradients reduced in fp32, when training in bf16); `model` itself becomes
    the sharded model, so build the optimizer after this."""
    if world.size > 1 and cfg["parallel"] == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embedding (tied head) and final norm
    train_model = compile_model(model, cfg, device)
    if world.size > 1 and cfg["parallel"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        gpu = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=gpu)
    return train_model


def gradient_sync(model, on: bool):
    """Averaging the gradients across processes only on the last micro-batch of a step: accumulation
    micro-steps would send the same sum piece by piece (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if on else model.no_sync()
    sharded = getattr(model, "_orig_mod", model)
    if hasattr(sharded, "set_requires_gradient_sync"):
        sharded.set_requires_gradient_sync(on)
    return nullcontext()


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over all processes (x itself in one): losses are measured on each process's own rows."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)  # a sum: gloo has no average
    return x / dist.get_world_size()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is on any: a Ctrl-C that reaches the processes at different steps must
    stop them all at the same one, or the ones still training would wait for the others forever."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(value: int | None, device: torch.device) -> int | None:
    """Rank 0's value on every process (a run length each process would plan from its own clock)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(-1 if value is None else value, device=device)
    dist.broadcast(t, 0)
    return None if t.item() < 0 else int(t.item())


def wait_for_rank0() -> None:
    if dist.is_initialized():
        dist.barrier()


def optimizer_parts(optimizer) -> dict:
    """The torch optimizers inside ours by name (Muon+AdamW has two); a checkpoint stores each one's state."""
    return {"muon": optimizer.muon, "adamw": optimizer.adamw} if hasattr(optimizer, "muon") else {"adamw": optimizer}


def resharded(model: LLM) -> bool:
    """Whether FSDP2 shards the model; if so its weights are put back in shards, as the optimizer knows them (an
    evaluation, with no backward, leaves the root's embedding and norm gathered)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()
    return isinstance(model, FSDPModule)


def whole_model(model: LLM) -> LLM | None:
    """The model to save, on rank 0 (None on the others): the model itself, or under FSDP2 a CPU copy gathered
    from the shards (every process must call this: gathering is collective)."""
    if not resharded(model):
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not weights:
        return None
    with torch.device("meta"):
        whole = LLM(model.cfg)
    whole.load_state_dict(weights, assign=True)  # takes the gathered tensors as they are: no second copy
    return whole


def whole_optimizer_state(model: LLM, optimizer) -> dict:
    """Each part's state keyed by parameter name, on the CPU, whole (gathered from the shards under FSDP2): the
    same file for any number of processes, so a run resumes on another number. Empty on ranks other than 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    resharded(model)
    return {name: get_optimizer_state_dict(model, part, options=options)
            for name, part in optimizer_parts(optimizer).items()}


def simulate_fault(world: World, step: int, stop: list) -> None:
    """Tests only ($TRAIN_FAULT): at step 2 the last rank dies ("exit"), or stops answering ("hang") until
    torchrun's SIGTERM, as a crashed or stuck GPU would; the others must then stop with a clear error."""
    fault = os.environ.get(FAULT_ENV)
    if fault not in ("exit", "hang") or world.size == 1 or world.rank != world.size - 1 or step != 2:
        return
    while fault == "hang" and not stop:
        time.sleep(0.1)
    os._exit(1)


def run_torchrun(main) -> None:
    """run_main for one process of a torchrun job, ending it the way that is reliable with gloo (NOTES.md):
    after a good run every process meets the others, closes the process group and leaves with os._exit, which
    skips an interpreter exit that aborts 1 time in 3-4. A process that lost the others (one died, or did not
    answer within --dist_timeout) says so in one line; torchrun then stops the rest and exits non-zero."""
    code = 1
    try:
        run_main(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # a lost process: NCCL raises a DistError, gloo a RuntimeError naming gloo
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e)):
            print(f"error: rank {os.environ['RANK']} lost the other processes (one stopped, or did not answer "
                  f"within --dist_timeout): {str(e).splitlines()[0]} (see README: torchrun hangs or stops)",
                  file=sys.stderr)
        else:
            traceback.print_exc()
    if code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -----------------------------------------------------------------------------
# Monitoring


def peak_flops(device: torch.device, autocast: torch.dtype | None) -> float | None:
    """FLOP/s that MFU divides by: a GPU's spec-sheet BF16 figure, or on a CPU a matmul measured once in the
    training dtype (CPUs differ too much in cores, AVX-512 and bf16 units for a table)."""
    if device.type == "cuda":
        sheet = modern_llm.datasheet_flops(torch.cuda.get_device_name(device))
        return sheet["bf16"] if sheet else None
    if device.type != "cpu":
        return None
    return modern_llm.measured_matmul_flops(device, autocast or torch.float32)


def system_line(device: torch.device) -> str:
    """CPU and RAM (psutil), and on NVIDIA GPUs utilisation, temperature and power (nvidia-ml-py)."""
    import psutil

    vm = psutil.virtual_memory()
    parts = [f"cpu {psutil.cpu_percent():.0f}%", f"ram {vm.used / GiB:.1f}/{vm.total / GiB:.1f} GiB",
             f"process {psutil.Process().memory_info().rss / GiB:.2f} GiB"]
    if device.type == "cuda":
        try:
            import pynvml
        except ImportError:
            return " | ".join(parts + ["GPU figures need: pip install nvidia-ml-py"])
        try:
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            parts.append(f"gpu {pynvml.nvmlDeviceGetUtilizationRates(h).gpu}% "
                         f"{pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}C "
                         f"{pynvml.nvmlDeviceGetPowerUsage(h) / 1000:.0f} W")
        except pynvml.NVMLError as e:
            parts.append(f"gpu figures unavailable ({e})")
    return " | ".join(parts)


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / GiB:.1f}G"
    import psutil

    return f"{psutil.Process().memory_info().rss / GiB:.1f}G rss"


class Monitor:
    """Where the figures go: OUT_DIR/metrics.jsonl (a line per step and per evaluation), loss.png (redrawn at
    each evaluation), TensorBoard when installed, and the tqdm bar. A resumed run keeps the lines up to its
    step and drops those of the steps it will redo."""

    def __init__(self, out: Path, start_step: int, total: int | None, enabled: bool = True):
        from tqdm import tqdm

        self.path, self.png = out / "metrics.jsonl", out / "loss.png"
        self.history, self.file, self.tb = [], None, None
        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, disable=not enabled)
        if not enabled:  # under torchrun only rank 0 writes and draws
            return
        if start_step and self.path.is_file():
            lines = self.path.read_text().splitlines()
            self.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= start_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # TensorBoard is optional: pip install tensorboard
            self.tb = None

    def evaluation(self, step: int, result: dict, text: str) -> None:
        self.log({"step": step, **result})
        self.plot()
        self.bar.write(f"step {step}: val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.1f}, "
                       f"{result['val_bpb']:.3f} bits/byte | {text!r}")

    def train_step(self, record: dict, device: torch.device, log_interval: int) -> None:
        self.log(record)
        self.bar.update()
        mfu = f"{record['mfu']:.1%}" if record["mfu"] else "n/a"
        self.bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} "
                                 f"tok/s mfu {mfu} mem {memory_in_use(device)}")
        if record["step"] % log_interval == 0:
            self.bar.write(f"step {record['step']}: {system_line(device)}")

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def plot(self) -> None:
        if self.file is None:
            return
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5))
        ax = fig.subplots()
        for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "validation")):
            points = [(r["step"], r[key]) for r in self.history if key in r]
            if points:
                ax.plot(*zip(*points), style, lw=1, label=label)
        ax.set(xlabel="step", ylabel="loss (nats per token)", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, self.png)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


@contextmanager
def stop_requests():
    """Ctrl-C and SIGTERM ask the loop to stop at the next step boundary, where it saves a checkpoint; a second
    Ctrl-C interrupts at once. Yields the list the signal names are appended to."""
    requested: list[str] = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -----------------------------------------------------------------------------
# main


def main(argv: list[str]) -> int:
    cfg, given = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    typed = set(given)
    resume = find_resume(cfg)
    saved = trainer_state(resume) if resume else {}
    for name, value in saved.get("config", {}).items():  # a resumed run keeps its settings unless given again
        if name in cfg and name not in given and name not in NOT_INHERITED:
            cfg[name] = value
            given.add(name)
    if cfg["preset"] not in ("auto", *HARDWARE):
        raise UserError(f"--preset={cfg['preset']!r} is not one of: auto, {', '.join(HARDWARE)}", "Hardware presets")
    device = pick_device(cfg["device"])
    preset = choose_preset(cfg["preset"], device)
    finetune_defaults(cfg, given, typed)
    apply_preset(cfg, given, preset)
    validate(cfg)
    autocast_to = autocast_dtype(cfg["dtype"], device)
    device, world = start_processes(device, cfg["dist_timeout"])

    # Data and model shape; everything is checked before OUT_DIR is touched
    init = resolve_init_from(cfg["init_from"]) if cfg["init_from"] else None
    init_state = load_state_dict(init) if init and not resume else None  # a missing shard stops us here
    data_dir = in_turn(world, lambda: prepare_dataset(cfg, init))
    meta = prepare_data.load_meta(data_dir)
    model_cfg = pretrained_config(init, meta) if init else model_preset(cfg["model"], vocab_size=meta["vocab_size"])
    if cfg["seq_len"] > model_cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg['seq_len']} is above the {cfg['init_from'] or cfg['model']} model's "
                        "maximum of "
                        f"{model_cfg.max_seq_len}", "Configuration")
    if resume:
        check_same_model(resume, model_cfg)
    train_data = prepare_data.batch_loader(data_dir, "train", cfg["batch_size"], cfg["seq_len"], cfg["seed"],
                                           world.rank, world.size)
    val_data = prepare_data.batch_loader(data_dir, "val", cfg["batch_size"], cfg["seq_len"], cfg["seed"], world.rank,
                                         world.size)
    tokenizer = prepare_data.load_tokenizer(meta["tokenizer_dir"])
    plan_memory(cfg, given, model_cfg, device, preset, autocast_to, world)

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fp32 matmuls on tensor cores, ~10 mantissa bits
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f".{modern_llm.CHECKPOINT_PREFIX}*"):  # half-written or half-deleted by a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    model = build_model(model_cfg, device, cfg, init_state)
    del init_state  # the model holds the weights now
    if resume:
        load_weights(model, load_state_dict(resume), str(resume))  # before the model is split across processes
    train_model = parallelize(model, cfg, world, device, autocast_to)
    optimizer = build_optimizer(model, cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_to == torch.float16)
    start_step, max_steps = 0, None if cfg["max_minutes"] else cfg["max_steps"]
    if resume:
        restore(resume, model, optimizer, scaler)
        start_step = saved["global_step"]
        if "max_steps" in typed:
            max_steps = cfg["max_steps"]
        elif "max_minutes" not in typed:
            max_steps = saved.get("max_steps")
        print(f"resuming from {resume} at step {start_step}")
    autocast = torch.autocast(device.type, dtype=autocast_to or torch.float32, enabled=autocast_to is not None)
    token_ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    global_batch = cfg["batch_size"] * cfg["grad_accum"] * world.size  # sequences per optimizer step
    tokens_per_step = global_batch * cfg["seq_len"]
    if saved.get("global_batch", global_batch) != global_batch:  # e.g. resumed on another number of GPUs
        print(f"note: the global batch was {saved['global_batch']} sequences and is now {global_batch}: to keep it, "
              "give --batch_size or --grad_accum (see README: Several GPUs)")
    flops_per_step = flops_per_token(model_cfg, cfg["seq_len"]) * tokens_per_step
    peak = peak_flops(device, autocast_to)  # of one GPU (or CPU process): MFU divides by all of them
    # chat data: bytes per token the loss is on (the assistant's)
    bytes_per_token = (meta.get("val_target_bytes", meta["val_bytes"])
                       / meta.get("val_target_tokens", meta["val_tokens"]))
    print(f"{cfg['init_from'] or cfg['model']} model, {count_params(model_cfg) / 1e6:.1f}M parameters | "
          f"preset {preset} | {device} "
          f"{str(autocast_to or torch.float32).removeprefix('torch.')} | {cfg['optimizer']} | compile "
          f"{getattr(train_model, 'module', train_model) is not model} | "
          f"activation checkpointing {cfg['activation_checkpointing']} | "
          f"{tokens_per_step:,} tokens/step (global batch {global_batch} = micro-batch {cfg['batch_size']} x "
          f"accumulation {cfg['grad_accum']} x {world.size} processes, of {cfg['seq_len']} tokens) | "
          f"data {data_dir}")

    monitor = Monitor(out, start_step, max_steps, enabled=world.rank == 0)
    best = saved.get("best_val_loss")
    step, bad, last_eval, eval_step, eval_seconds = start_step, 0, None, None, 0.0
    t_start = time.time()
    budget = TimeBudget(cfg["max_minutes"], start_step) if max_steps is None else None
    last_saved = resume
    code = 0
    with stop_requests() as stop:
        try:
            while True:
                finished = max_steps is not None and step >= max_steps
                eval_due = step % cfg["eval_interval"] == 0 and (step != start_step or step == 0)
                if eval_due or finished:
                    t = time.time()
                    last_eval, eval_step = evaluate(model, val_data, cfg["eval_steps"], autocast, device,
                                                    bytes_per_token), step
                    best = last_eval["val_loss"] if best is None else min(best, last_eval["val_loss"])
                    text = sample(model, tokenizer, token_ids["eos_id"], 32, autocast, device, cfg["seed"] + step)
                    eval_seconds = time.time() - t
                    monitor.evaluation(step, last_eval, text)
                session_ends = finished or any_process(bool(stop), device) or 0 < cfg["stop_after"] <= step
                if step != start_step and bad == 0 and (step % cfg["checkpoint_interval"] == 0 or session_ends):
                    record = {"global_step": step, "max_steps": max_steps, "best_val_loss": best,
                              "val_loss": last_eval["val_loss"] if eval_step == step else None,
                              "tokens_seen": step * tokens_per_step, "global_batch": global_batch,
                              "config": cfg}
                    last_saved = save_training_checkpoint(out, step, model, optimizer, scaler, tokenizer, record,
                                                          token_ids)
                    if world.rank == 0:
                        prune_checkpoints(out, cfg["keep_checkpoints"])
                if finished:
                    save_final_model(out, model, tokenizer, token_ids, step, best)
                if session_ends:
                    break

                # one optimizer step
                simulate_fault(world, step, stop)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(step, cfg, max_steps)
                t = time.time()
                micro = [train_data.get_batch(step, m, device) for m in range(cfg["grad_accum"])]
                result = train_step(train_model, optimizer, scaler, micro, autocast, cfg["grad_clip"])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.time() - t
                step += 1
                if result is None:
                    bad += 1
                    monitor.log({"step": step, "skipped": "non-finite loss or gradient"})
                    if bad >= cfg["max_bad_steps"]:
                        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint yet"
                        raise UserError(f"the loss was NaN/inf {bad} steps in a row (step {step}): stopped without "
                                        f"saving; {where}. Lower --lr, raise --warmup_steps or use --dtype=bfloat16, "
                                        "then --resume=auto", "Loss is NaN or inf")
                    continue
                bad = 0
                monitor.train_step({"step": step, "loss": result[0], "lr": optimizer.param_groups[0]["lr"],
                                    "grad_norm": result[1], "tokens_per_s": tokens_per_step / dt,
                                    "mfu": flops_per_step / dt / (peak * world.size) if peak else None,
                                    "elapsed_s": time.time() - t_start}, device, cfg["log_interval"])
                if max_steps is None:
                    max_steps = from_rank0(budget.plan(step, eval_seconds, cfg), device)
                    if max_steps is not None:
                        monitor.bar.total = max_steps
                        monitor.bar.write(f"the {cfg['max_minutes']:g}-minute budget allows {max_steps} steps")
        except torch.OutOfMemoryError:
            raise UserError(f"out of GPU memory at step {step}: lower --batch_size (raise --grad_accum to keep the "
                            "tokens per step), lower --seq_len, set --activation_checkpointing=true or use "
                            f"--optimizer=muon; the last checkpoint is {last_saved}", "Out of memory") from None
        finally:
            monitor.close()
        if stop:
            print(f"stopped by {stop[0]} at step {step}: saved {last_saved}; continue with --resume=auto")
            code = 130 if stop[0] == "SIGINT" else 143

    if finished:
        elapsed = time.time() - t_start
        trained = (step - start_step) * tokens_per_step
        print(f"\ndone: {step} steps, val loss {last_eval['val_loss']:.4f} (perplexity {last_eval['val_ppl']:.1f}, "
              f"{last_eval['val_bpb']:.3f} bits/byte), {elapsed / 60:.1f} min, {trained / elapsed:,.0f} tokens/s")
        text = sample(model, tokenizer, token_ids["eos_id"], 100, autocast, device, cfg["seed"])
        print(f"sample:\n{text}\n")
        print(f"model saved to {out}/ (checkpoints: {', '.join(p.name for p in list_checkpoints(out))}); try:\n"
              f"  python text_generator.py --checkpoint={out}")
    elif not stop:
        print(f"stopped after step {step} (--stop_after): saved {last_saved}; continue with --resume=auto")
    return code


if __name__ == "__main__":
    (run_torchrun if "WORLD_SIZE" in os.environ else run_main)(main)
