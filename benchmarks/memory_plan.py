"""
The memory planner against measured memory: modern_llm.estimate_training_memory's figures for weights,
gradients, optimizer state, activations, the loss's logits and the peak, next to what a training step of the
same model allocates, for several model sizes, side by side with the ratio (the planner is right within 15%).

    python speed_optimizations_2025.py memory_plan                   # CPU: the profiler's allocation events
    python speed_optimizations_2025.py memory_plan --device=cuda     # torch.cuda.max_memory_allocated

Measured: weights, gradients and optimizer state are the bytes of those tensors; activations are the bytes
the forward pass leaves allocated (what it saved for backward) less the loss's share; logits are the
allocation peak of the loss alone on inputs of the same shape; the peak is that of a whole step (forward,
backward, fused AdamW) over the weights and optimizer state that live through it. Eager (torch.compile saves
less, so the plan is an upper bound there).
"""

from __future__ import annotations

import torch

import modern_llm as ml
from cli import UserError, parse_flags, pick_device, run_main, settings_block
from cross_entropy import linear_cross_entropy
from muon_optimizer import build_optimizer
from speed_optimizations_2025 import allocations, optimizer_state_bytes

DEVICE = "cpu"  # cpu or cuda
MODELS = ["tiny", "small", "125m"]  # size presets to measure (repeatable flag)
BATCH_SIZE = 4  # rows per step
SEQ_LEN = 128  # tokens per row
DTYPE = "bfloat16"  # autocast dtype, or float32 for none
CHECKPOINTING = False  # activation checkpointing
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

PARTS = ("weights", "grads", "optimizer", "activations", "logits", "peak")


def measure_training_memory(cfg: ml.ModelConfig, batch_size: int, seq_len: int, device: torch.device,
                            autocast: bool = True, checkpointing: bool = False) -> dict[str, int]:
    """Bytes of each part of a training step as allocated (see the module docstring), on `device`."""
    torch.manual_seed(0)
    model = ml.LLM(cfg).to(device)
    model.activation_checkpointing = checkpointing
    opt = build_optimizer(model, "adamw", fused=True)
    x, y = torch.randint(0, cfg.vocab_size, (2, batch_size, seq_len), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    def step():
        with amp:
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    weights = sum(p.nbytes for p in model.parameters())
    state = optimizer_state_bytes(opt)
    kept = []  # the loss, kept alive past the measured call with the graph it holds
    with amp:
        forward = allocations(lambda: kept.append(model(x, y)), device)[1]  # the loss's share included
    kept.pop().backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt.zero_grad(set_to_none=True)

    h = torch.randn(batch_size * seq_len, cfg.d_model, device=device, requires_grad=True)
    with amp:
        logits, loss_kept = allocations(lambda: kept.append(linear_cross_entropy(h, model.output_weight,
                                                                                    y.reshape(-1))), device)
    kept.clear()
    peak = weights + state + allocations(step, device)[0]
    return {"weights": weights, "grads": grads, "optimizer": state, "activations": forward - loss_kept,
            "logits": logits, "peak": peak}


def planned(cfg: ml.ModelConfig, batch_size: int, seq_len: int, autocast: bool, checkpointing: bool) -> dict:
    """The planner's figures for the same run, its peak without the allowance for fragmentation."""
    plan = ml.estimate_training_memory(cfg, batch_size, seq_len, "adamw", checkpointing, autocast)
    return {**plan, "peak": round(plan.pop("total") / ml.FRAGMENTATION)}


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = ["| model | part | planned MiB | measured MiB | planned / measured |", "| --- | --- | --- | --- | --- |"]
    for name, plan, got in rows:
        for part in PARTS:
            lines.append(f"| {name} | {part} | {plan[part] / 2**20:,.2f} | {got[part] / 2**20:,.2f} | "
                         f"{plan[part] / got[part]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    device = pick_device(cfg["device"])
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device={cfg['device']!r}: the memory check measures cpu or cuda", "Performance")
    if cfg["dtype"] not in ("bfloat16", "float32"):
        raise UserError(f"--dtype={cfg['dtype']!r}: choose bfloat16 (autocast) or float32", "Performance")
    autocast = cfg["dtype"] == "bfloat16"
    rows = []
    for name in cfg["models"]:
        model_cfg = ml.model_preset(name)
        if cfg["seq_len"] > model_cfg.max_seq_len:
            raise UserError(f"--seq_len={cfg['seq_len']} exceeds the {name} model's context of "
                            f"{model_cfg.max_seq_len}", "Performance")
        got = measure_training_memory(model_cfg, cfg["batch_size"], cfg["seq_len"], device, autocast,
                                      cfg["checkpointing"])
        rows.append((name, planned(model_cfg, cfg["batch_size"], cfg["seq_len"], autocast, cfg["checkpointing"]), got))
    print(f"memory plan vs measured: batch {cfg['batch_size']} x {cfg['seq_len']}, {device}, "
          f"{'bf16 autocast' if autocast else 'fp32'}, activation checkpointing {cfg['checkpointing']}, eager, "
          f"fused AdamW, torch {torch.__version__}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    run_main(main)
