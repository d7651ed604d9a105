"""
A training run's directory and what it takes to resume one exactly.

OUT_DIR/checkpoint-<step>/ is a complete Hugging Face checkpoint (checkpoint.py) plus the training state beside
it: trainer_state.json (step, schedule length, validation loss, the task: "pretrain" or chat fine-tuning "sft",
the run's settings) and training_state.pt
(optimizer, GradScaler and RNG states, loaded with weights_only=True). The newest KEEP_CHECKPOINTS are kept,
plus the best by validation loss; the final model goes to OUT_DIR itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from checkpoint import (CHECKPOINT_PREFIX, STATE_FILE, CheckpointError, is_complete_checkpoint, list_checkpoints,
                        read_config, resolve_checkpoint, save_checkpoint)
from cli import UserError
from distributed import load_optimizer_state, wait_for_rank0, whole_model, whole_optimizer_state
from modern_llm import LLM

TRAINING_STATE = "training_state.pt"  # optimizer, GradScaler and RNG states, beside a checkpoint's weights

# -----------------------------------------------------------------------------
# Finding what to resume


def find_resume(cfg: dict) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run never overwrites another run."""
    out = Path(cfg["out_dir"])
    existing = list_checkpoints(out) if out.is_dir() else []
    if cfg["resume"] == "auto":
        return existing[-1] if existing else None
    if cfg["resume"]:
        found = list_checkpoints(cfg["resume"]) if Path(cfg["resume"]).is_dir() else []
        path = found[-1] if found else resolve_checkpoint(cfg["resume"])
        if not (path / TRAINING_STATE).is_file() or not (path / STATE_FILE).is_file():
            raise UserError(f"--resume={cfg['resume']}: {path} holds no training state ({TRAINING_STATE}); only "
                            "checkpoints written by this script can be resumed", "Resuming a run")
        return path
    if existing or is_complete_checkpoint(out):
        raise UserError(f"{out} already holds a training run: continue it with --resume=auto, or start a new one "
                        "with another --out_dir", "Resuming a run")
    return None


def trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is unreadable ({e})") from None


def check_same_model(path: Path, model_cfg) -> None:
    saved = read_config(path)
    if saved != model_cfg:
        def shape(c):
            return f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head}/{c.n_kv_head} heads, vocab {c.vocab_size}"
        raise UserError(f"--resume: {path} holds another model ({shape(saved)}) than this run builds "
                        f"({shape(model_cfg)}): resume with that run's --model and tokenizer, or start a new run "
                        "in another --out_dir", "Resuming a run")


# -----------------------------------------------------------------------------
# Saving


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
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    path = out / f"{CHECKPOINT_PREFIX}{step}"
    if whole is not None:
        if path.exists():  # only when resuming from an older checkpoint of the same run
            remove_dir(path)
        save_checkpoint(whole, path, extra=extra, token_ids=token_ids)
    wait_for_rank0()  # no process goes on (or resumes) before the files are there
    return path


def save_final_model(out: Path, model: LLM, tokenizer, token_ids: dict, step: int, best: float | None,
                     task: str) -> None:
    """The final model at OUT_DIR itself, as the Hugging Face Trainer leaves it: from_pretrained(OUT_DIR) works.
    Its task tells serve.py's chat page whether the model has seen chats (checkpoint.trained_on_chats)."""
    def extra(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))
        record = {"global_step": step, "best_val_loss": best, "task": task}
        (tmp / STATE_FILE).write_text(json.dumps(record) + "\n")

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
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
        load_optimizer_state(model, optimizer, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--resume: {path / TRAINING_STATE} does not load into this run's optimizer "
                        f"({str(e).splitlines()[0]}): resume with that run's --optimizer", "Resuming a run") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
