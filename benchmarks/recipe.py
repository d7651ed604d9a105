"""
The training recipe sweep: short runs of the default CPU run's setting (the `small` model, the cpu preset, the
built-in corpus), each trial changing a few settings, all built and stepped by gpu_training_optimized.py's own
setup() and one_step(); a table of validation bits per byte against the training time each trial had.

    python speed_optimizations_2025.py recipe                      # every trial below, at every budget
    python speed_optimizations_2025.py recipe --trials="lr4e-3 lr=4e-3" --budgets=60

A budget is CPU seconds of training (time.process_time of this process: all its threads), not wall-clock: on a
shared machine the wall-clock of a run depends on what else runs, its CPU time much less. As in a
--max_minutes run, the schedule's length is fixed from the step cost measured over the first steps, so the
learning rate reaches MIN_LR as the budget runs out. A trial is a shortened default run, so its warm-up is
shortened alike (WARMUP_SCALE): else the short trials would spend most of their steps warming up.
THREADS=1 keeps CPU time honest on a busy machine (idle
threads spinning at a barrier count as CPU time too); an idle 2-core machine trains ~1.5x faster in wall-clock.
Trials run interleaved (every trial at the first budget, then at the next), so a change in the machine's load
hits all of them alike. Keep a change only if it wins at two budgets.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import gpu_training_optimized as training
from cli import UserError, parse_flags, pick_device, pick_dtype, run_main, settings_block
from distributed import World
from schedule import Schedule

# CPU seconds of training per trial (repeatable flag); each trial runs at every budget. The first only warms
# torch.compile's cache, so that no trial pays for compiling at the budgets that count.
BUDGETS = [10.0, 90.0, 270.0]
# Trials: "name setting=value ...", settings of gpu_training_optimized.py (on top of its cpu preset) or of
# muon_optimizer.build_optimizer (ns_coefficients, normuon, cautious_weight_decay, ns_steps, momentum)
TRIALS = [
    "default",
    "muon-lr2e-3 lr=2e-3 min_lr=2e-4",
    "adamw optimizer=adamw lr=2e-3 min_lr=2e-4",
    "adamw-lr3e-3 optimizer=adamw",
    "muon-b16 batch_size=16 lr=2e-3 min_lr=2e-4",
    "vocab4096 vocab_size=4096 lr=2e-3 min_lr=2e-4",
]
WARMUP_SCALE = 0.4  # each trial's warm-up is its WARMUP_STEPS times this (a trial is a shortened default run)
THREADS = 1  # torch threads per trial (see the docstring)
MEASURE_STEPS = 5  # steps whose CPU time sets the schedule's length (after 2 untimed ones)
DATA_ROOT = "/tmp/recipe/data"  # token shards, one folder per vocabulary size (tokenized once)
OUT_DIR = "/tmp/recipe"  # results.json, and the trials' (unsaved) run folders
SEED = 1337  # the same weights and batches for every trial
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

OPTIMIZER_SETTINGS = {"ns_coefficients": str, "normuon": bool, "cautious_weight_decay": bool, "ns_steps": int,
                      "momentum": float}


def parse_trial(text: str) -> tuple[str, list[str], dict]:
    """ "name k=v ..." -> (name, training flags, optimizer keyword arguments)."""
    name, *pairs = text.split()
    flags, extra = [], {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"trial {name!r}: {pair!r} is not setting=value", "Training recipe")
        if key in OPTIMIZER_SETTINGS:
            kind = OPTIMIZER_SETTINGS[key]
            extra[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        else:
            flags.append(f"--{key}={value}")
    return name, flags, extra


def trial_settings(flags: list[str], seed: int, out_dir: Path, data_root: str,
                   warmup_scale: float) -> tuple[dict, set[str]]:
    """The training script's settings for one trial: its defaults, its cpu preset, then the trial's flags."""
    argv = [f"--seed={seed}", f"--out_dir={out_dir}", f"--data_root={data_root}", "--preset=cpu", *flags]
    cfg, typed = parse_flags(training._FLAG_DEFAULTS, argv, training.__file__)
    training.apply_preset(cfg, typed, "cpu")
    cfg["max_steps"], cfg["max_minutes"] = 0, 1.0  # the length comes from the CPU budget below
    training.validate(cfg)
    cfg["warmup_steps"] = max(1, round(cfg["warmup_steps"] * warmup_scale))
    return cfg, typed


def run_trial(name: str, flags: list[str], extra: dict, budget: float, cfg_all: dict) -> dict:
    """One trial: setup() as the training script does it, then steps until the CPU budget is spent."""
    out = Path(cfg_all["out_dir"]) / "runs" / name
    cfg, typed = trial_settings(flags, cfg_all["seed"], out, cfg_all["data_root"], cfg_all["warmup_scale"])
    device = pick_device("cpu")
    dtype = pick_dtype(cfg["dtype"], device)
    run = training.setup(cfg, None, {}, None, device, World(), "cpu", dtype)
    if extra:  # optimizer variants the training script does not expose as flags
        from muon_optimizer import build_optimizer

        run.optimizer = build_optimizer(run.model, cfg["optimizer"], lr=cfg["lr"],
                                        weight_decay=cfg["weight_decay"], **extra)
    run.schedule = Schedule(cfg, None)  # its length is set once the step cost is measured
    cpu0, wall0 = time.process_time(), time.time()
    step, mark = 0, None
    while run.schedule.length is None or step < run.schedule.length:
        result, _ = training.one_step(run, step)
        step += 1
        if result is None or not math.isfinite(result[0]):
            break
        if step == 2:
            mark = time.process_time()
        elif run.schedule.length is None and step == 2 + cfg_all["measure_steps"]:
            per_step = (time.process_time() - mark) / cfg_all["measure_steps"]
            run.schedule.length = step + max(1, int((budget - (time.process_time() - cpu0)) / per_step))
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    ev = training.evaluate(run.model, run.val_data, cfg["eval_steps"], run.autocast, device, run.bytes_per_token)
    return {"trial": name, "budget_cpu_s": budget, "steps": step, "tokens": step * run.tokens_per_step,
            "val_bpb": ev["val_bpb"], "val_loss": ev["val_loss"], "cpu_s": cpu, "wall_s": wall,
            "warmup_steps": cfg["warmup_steps"], "planned_steps": run.schedule.length,
            "end_lr": run.optimizer.param_groups[0]["lr"], "min_lr": cfg["min_lr"],
            "settings": " ".join([*flags, *(f"{k}={v}" for k, v in extra.items())]) or "(cpu preset)"}


def table(rows: list[dict]) -> str:
    lines = [f"{'trial':<18} {'budget':>7} {'steps':>6} {'warm-up':>8} {'bits/byte':>10} {'cpu s':>7} {'wall s':>7}  "
             "settings"]
    for r in sorted(rows, key=lambda r: (r["budget_cpu_s"], r["val_bpb"])):
        lines.append(f"{r['trial']:<18} {r['budget_cpu_s']:>7g} {r['steps']:>6} {r['warmup_steps']:>8} "
                     f"{r['val_bpb']:>10.4f} {r['cpu_s']:>7.0f} {r['wall_s']:>7.0f}  {r['settings']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    trials = [parse_trial(t) for t in cfg["trials"]]
    budgets = [float(b) for b in cfg["budgets"]]
    if not trials or not budgets or any(not b > 0 for b in budgets):
        raise UserError("give at least one --trials and one --budgets, each budget > 0 CPU seconds",
                        "Training recipe")
    for _, flags, _ in trials:  # every trial's settings checked before the first one trains
        trial_settings(flags, cfg["seed"], Path(cfg["out_dir"]), cfg["data_root"], cfg["warmup_scale"])
    torch.set_num_threads(cfg["threads"])
    rows = []
    for budget in budgets:
        for name, flags, extra in trials:
            rows.append(run_trial(name, flags, extra, budget, cfg))
            r = rows[-1]
            print(f"== {name} @ {budget:g} CPU s: {r['steps']} steps, {r['val_bpb']:.4f} bits/byte, "
                  f"{r['cpu_s']:.0f} CPU s, {r['wall_s']:.0f} s wall", flush=True)
    Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(cfg["out_dir"]) / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nthreads {torch.get_num_threads()}; budgets are CPU seconds of training (see --help)\n{table(rows)}")
    return 0


if __name__ == "__main__":
    run_main(main)
