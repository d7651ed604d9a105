"""
Muon+AdamW against AdamW on the built-in corpus: the `small` model trained from the same initial weights and data
order with each optimizer over a short learning-rate sweep; the table of final validation losses, how many steps
the best Muon run needs to reach the best AdamW run's loss, the time that takes (wall-clock, and CPU time of
this process, which a busy shared machine disturbs much less), and a PNG of the curves.

    python muon_optimizer.py          # the same as python speed_optimizations_2025.py muon
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cli import UserError, parse_flags, run_main, settings_block
from modern_llm import LLM, model_preset
from muon_optimizer import build_optimizer
from prepare_data import BatchLoader, load_meta, prepare
from schedule import Schedule

MODEL = "small"  # model size preset to train
DATA_DIR = "/tmp/muon_benchmark/data"  # where the built-in corpus is tokenized (once)
OUT_DIR = "/tmp/muon_benchmark"  # where the results table and the PNG go
STEPS = 80  # optimizer steps per run (the same for every run)
BATCH_SIZE = 8  # sequences per step (8 x 256: the default CPU run's batch, so Muon's per-step cost is its real share)
SEQ_LEN = 256  # tokens per sequence
WARMUP_STEPS = 10  # linear warmup, then linear decay to 10% of the peak lr (the wsd schedule, all decay)
WEIGHT_DECAY = 0.1  # decoupled weight decay, both optimizers
ADAMW_LRS = [2e-3, 4e-3]  # AdamW learning rates swept (the best is kept)
MUON_LRS = [2e-3, 4e-3]  # Muon+AdamW learning rates swept (match_rms_adamw scaling: AdamW-like values)
NORMUON = False  # Muon with NorMuon's per-neuron normalisation (muon_optimizer.normalise_rows)
EVAL_INTERVAL = 10  # steps between validation losses
EVAL_BATCHES = 4  # validation batches per evaluation
THREADS = 1  # torch CPU threads; 1 is steadier than 2 on a busy shared machine; 0 = torch's default
SEED = 1337  # same data order and initial weights for every run
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


@torch.no_grad()
def val_loss(model, batches) -> float:
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train_run(cfg: dict, model_cfg, data_dir, optimizer: str, lr: float, val_batches) -> dict:
    """One run from the same initial weights and data order: its val-loss curve and its time per step."""
    torch.manual_seed(cfg["seed"])
    model = LLM(model_cfg)
    extra = {"normuon": cfg["normuon"]} if optimizer == "muon" else {}
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=cfg["weight_decay"], **extra)
    train = BatchLoader(data_dir, "train", cfg["batch_size"], cfg["seq_len"], seed=cfg["seed"])
    lrs = Schedule({"warmup_steps": cfg["warmup_steps"], "lr": 1.0, "min_lr": 0.1, "schedule": "wsd",
                    "decay_fraction": 1.0}, cfg["steps"])
    curve, step_s, opt_s, cpu_s = [(0, val_loss(model, val_batches))], [], [], []
    for step in tqdm(range(cfg["steps"]), desc=f"{optimizer} lr={lr:g}", leave=False, mininterval=5):
        factor = lrs.factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        x, y = train.get_batch(step)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", torch.bfloat16):  # bf16 matmuls are ~4x faster than fp32 on this kind of CPU
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before_step = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - cpu_start)
        opt_s.append(time.perf_counter() - before_step)
        if (step + 1) % cfg["eval_interval"] == 0 or step + 1 == cfg["steps"]:
            curve.append((step + 1, val_loss(model, val_batches)))
            if not math.isfinite(curve[-1][1]):
                break  # diverged: this learning rate is out of the running
    # Medians: on a shared machine they ignore the steps another process stalled.
    return {"optimizer": optimizer, "lr": lr, "curve": curve, "final": curve[-1][1],
            "ms_per_step": 1e3 * statistics.median(step_s), "optimizer_ms": 1e3 * statistics.median(opt_s),
            "cpu_ms_per_step": 1e3 * statistics.median(cpu_s)}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the val loss reaches target, interpolated between evaluations."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 - (s1 - s0) * (target - l1) / (l0 - l1) if l0 > target else s0
    return None


def report(runs: list[dict], out_dir) -> str:
    """The table of every run and the comparison of the best of each optimizer; draws the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"{'optimizer':<11} {'lr':>8} {'final val loss':>15} {'ms/step':>9} {'CPU ms/step':>12} "
             f"{'optimizer ms':>13}"]
    for r in runs:
        lines.append(f"{r['optimizer']:<11} {r['lr']:>8g} {r['final']:>15.4f} {r['ms_per_step']:>9.0f} "
                     f"{r['cpu_ms_per_step']:>12.0f} {r['optimizer_ms']:>13.1f}")
    best = {name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final"])
            for name in ("adamw", "muon")}
    target = best["adamw"]["final"]
    lines.append(f"\nbest of each (by final val loss); target = AdamW's final val loss {target:.4f}")
    lines.append(f"{'optimizer':<11} {'lr':>8} {'val loss':>9} {'steps to target':>16} {'s to target':>12} "
                 f"{'CPU s to target':>16}")
    for name, r in best.items():
        reach = steps_to_reach(r["curve"], target)
        wall, cpu = ((f"{reach * r['ms_per_step'] / 1e3:.1f}", f"{reach * r['cpu_ms_per_step'] / 1e3:.1f}")
                     if reach is not None else ("-", "-"))
        lines.append(f"{name:<11} {r['lr']:>8g} {r['final']:>9.4f} "
                     f"{f'{reach:.0f}' if reach is not None else 'not reached':>16} {wall:>12} {cpu:>16}")
    reach = steps_to_reach(best["muon"]["curve"], target)
    if reach:
        steps = reach / best["adamw"]["curve"][-1][0]
        lines.append(f"Muon reaches AdamW's final loss in {steps:.2f}x the steps; its step costs "
                     f"{best['muon']['ms_per_step'] / best['adamw']['ms_per_step']:.2f}x AdamW's wall-clock and "
                     f"{best['muon']['cpu_ms_per_step'] / best['adamw']['cpu_ms_per_step']:.2f}x its CPU time, so it "
                     f"needs {steps * best['muon']['ms_per_step'] / best['adamw']['ms_per_step']:.2f}x the "
                     f"wall-clock ({steps * best['muon']['cpu_ms_per_step'] / best['adamw']['cpu_ms_per_step']:.2f}x "
                     "the CPU time) to get there (time per step: medians over the run)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        steps, losses = zip(*r["curve"])
        is_best = r is best[r["optimizer"]]
        ax.plot(steps, losses, color="tab:red" if r["optimizer"] == "muon" else "tab:blue",
                alpha=1.0 if is_best else 0.3, linewidth=2 if is_best else 1,
                label=f"{'Muon+AdamW' if r['optimizer'] == 'muon' else 'AdamW'} lr={r['lr']:g}")
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="step", ylabel="validation loss", title="Muon+AdamW vs AdamW (best lr bold)")
    ax.legend()
    png = Path(out_dir) / "muon_vs_adamw.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    lines.append(f"curves: {png}")
    return "\n".join(lines)


def parse_lrs(texts: list, flag: str) -> list[float]:
    try:
        lrs = [float(t) for t in texts]
    except ValueError:
        raise UserError(f"--{flag} expects numbers, got {texts}", "Muon") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise UserError(f"--{flag} needs at least one learning rate, each > 0, got {texts}", "Muon")
    return lrs


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    sweeps = {"adamw": parse_lrs(cfg["adamw_lrs"], "adamw_lrs"), "muon": parse_lrs(cfg["muon_lrs"], "muon_lrs")}
    for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches"):
        if cfg[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {cfg[name]}", "Muon")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    model_cfg = model_preset(cfg["model"])
    data_dir = prepare("builtin", cfg["data_dir"], vocab_size=model_cfg.vocab_size)
    model_cfg = model_preset(cfg["model"], vocab_size=load_meta(data_dir)["vocab_size"],
                             max_seq_len=max(cfg["seq_len"], model_cfg.max_seq_len))
    val = BatchLoader(data_dir, "val", cfg["batch_size"], cfg["seq_len"], seed=cfg["seed"])
    val_batches = [val.get_batch(i) for i in range(cfg["eval_batches"])]
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{cfg['model']} model, {cfg['steps']} steps of {cfg['batch_size']}x{cfg['seq_len']} tokens, "
          f"torch threads: {torch.get_num_threads()}, bf16 autocast on CPU")
    runs = []
    # Interleaved (AdamW, Muon, AdamW, ...), so a change in a shared machine's load hits both optimizers alike.
    order = [(name, lrs[i]) for i in range(max(map(len, sweeps.values()))) for name, lrs in sweeps.items()
             if i < len(lrs)]
    for name, lr in order:
        runs.append(train_run(cfg, model_cfg, data_dir, name, lr, val_batches))
        r = runs[-1]
        print(f"  {name:<6} lr={lr:g}: final val loss {r['final']:.4f}, {r['ms_per_step']:.0f} ms/step, "
              f"{r['cpu_ms_per_step']:.0f} CPU ms/step", flush=True)
    (out_dir / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(report(runs, out_dir))
    return 0


if __name__ == "__main__":
    run_main(main)
