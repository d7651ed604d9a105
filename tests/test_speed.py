"""speed_optimizations_2025.py: --quick runs every row end to end, rows that cannot run say why, bad flags are
one-line errors, and the pieces the figures rest on (the memory probe, the transformers twin) are right."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend

import speed_optimizations_2025 as speed
from conftest import ROOT
from cli import UserError

# Rows that must carry figures on a CPU, and rows that must instead say why they do not apply there.
MEASURED_ON_CPU = ["baseline", "bf16", "compile", "fused-adamw", "muon", "sdpa-flash", "sdpa-math", "checkpointing",
                   "grad-accum", "all", "transformers"]
NOT_ON_CPU = ["max-autotune", "sdpa-efficient", "sdpa-cudnn", "tf32"]


@pytest.mark.slow
def test_quick_report_has_every_row(tmp_path, capsys):
    assert speed.main(["--quick", "--device=cpu", f"--out={tmp_path}"]) == 0
    report = json.loads((tmp_path / "cpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert [r["row"] for r in report["rows"]] == [name for name, _, _ in speed.TECHNIQUES]
    assert sorted(MEASURED_ON_CPU + NOT_ON_CPU) == sorted(rows)
    for name in MEASURED_ON_CPU:
        r = rows[name]
        assert "note" not in r, f"{name}: {r.get('note')}"
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0 and r["mfu"] > 0 and r["speedup"] > 0
    for name in NOT_ON_CPU:
        assert "tokens_per_s" not in rows[name] and rows[name]["note"], name
    assert rows["baseline"]["speedup"] == 1.0
    # checkpointing keeps one block's activations instead of every block's: measurably less memory
    assert rows["checkpointing"]["peak_mib"] < rows["baseline"]["peak_mib"]
    assert report["model"] == "tiny" and report["batch_size"] * report["seq_len"] == 4 * 64
    table = (tmp_path / "cpu.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    assert "CUDA only" in table and (tmp_path / "cpu.png").stat().st_size > 0
    assert "| baseline |" in capsys.readouterr().out  # the table is printed too


def test_a_row_that_fails_reports_why_instead_of_stopping_the_run():
    bench = speed.make_bench({"model": "tiny", "batch_size": 2, "seq_len": 16, "warmup_steps": 0, "steps": 1,
                              "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.0, "seed": 0, "quick": True},
                             torch.device("cpu"))
    x = torch.randint(0, bench.cfg.vocab_size, (2, 16))
    row = speed.run_row(bench, lambda b: speed.Setup(sdpa=SDPBackend.EFFICIENT_ATTENTION), x, x)
    assert row["note"].startswith("failed: RuntimeError") and "tokens_per_s" not in row
    assert "tokens_per_s" in speed.run_row(bench, speed.baseline, x, x)


def test_grad_accum_that_does_not_divide_the_batch_is_explained(tmp_path):
    speed.main(["--quick", "--device=cpu", "--rows=grad-accum", "--batch_size=3", "--grad_accum=2",
                "--steps=1", "--warmup_steps=0", f"--out={tmp_path}"])
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["baseline", "grad-accum"]  # the baseline always runs
    assert "does not split" in rows[1]["note"]


@pytest.mark.parametrize("flags, message", [
    (["--rows=warp-drive"], "unknown --rows warp-drive"),
    (["--batch_size=0"], "--batch_size must be at least 1"),
    (["--model=tiny", "--seq_len=4096"], "exceeds the tiny model's context"),
    (["--device=tpu"], "choose auto, cpu or cuda"),
    (["--model=huge"], "unknown model size"),
])
def test_bad_flags_are_user_errors(flags, message):
    with pytest.raises(UserError, match=message):
        speed.main(flags)


def test_bad_flag_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "speed_optimizations_2025.py", "--rows=nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown --rows nope")


def test_cpu_peak_bytes_sees_a_temporary_tensor():
    model = nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    weights = sum(p.nbytes for p in model.parameters())
    peak = speed.cpu_peak_bytes(lambda: torch.ones(1 << 20).sum(), model, opt)  # 4 MiB, freed at once
    assert 4 * 2**20 + weights <= peak < 4.5 * 2**20


def test_transformers_twin_has_our_weights_and_loss():
    cfg = speed.ml.model_preset("tiny")
    bench = speed.Bench(device=torch.device("cpu"), cfg=cfg, model_name="tiny", batch_size=2, seq_len=32,
                        warmup_steps=0, steps=1, grad_accum=1, lr=1e-3, weight_decay=0.0, seed=3,
                        peak_flops={}, peak_source="")
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    y = torch.randint(0, cfg.vocab_size, (2, 32))
    ours = speed.build_model(bench, speed.Setup())
    theirs = speed.build_model(bench, speed.Setup(transformers=True))
    assert type(theirs.hf).__name__ == "LlamaForCausalLM"
    assert abs(ours(x, y).item() - theirs(x, y).item()) < 1e-5


# -- memory planner vs measured, and best against best ---------------------------------------------------------

@pytest.mark.parametrize("autocast, checkpointing", [(True, False), (False, False), (True, True)],
                         ids=["bf16", "fp32", "bf16-checkpointing"])
def test_memory_plan_is_within_15_percent_of_measured(autocast, checkpointing):
    """modern_llm.estimate_training_memory, part by part and at the peak, against what a step allocates."""
    from benchmarks import memory_plan

    cfg = speed.ml.model_preset("tiny")
    got = memory_plan.measure_training_memory(cfg, 4, 128, torch.device("cpu"), autocast, checkpointing)
    plan = memory_plan.planned(cfg, 4, 128, autocast, checkpointing)
    for part in memory_plan.PARTS:
        assert 0.85 <= plan[part] / got[part] <= 1.15, f"{part}: planned {plan[part]:,}, measured {got[part]:,}"


def test_memory_plan_report_prints_the_table(capsys):
    assert speed.main(["memory_plan", "--models=tiny", "--batch_size=2", "--seq_len=32"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | activations |" in out and "| tiny | peak |" in out


@pytest.mark.slow
def test_vs_transformers_report_runs_every_row(capsys):
    assert speed.main(["vs_transformers", "--models=tiny", "--batch_size=2", "--seq_len=32", "--steps=1",
                       "--warmup_steps=1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4
    assert "x transformers default" in rows[2] and "x transformers best" in rows[3]
    assert all(float(r.split("|")[3].replace(",", "")) > 0 for r in rows)  # tokens/s


@pytest.mark.parametrize("report, flags, message", [
    ("vs_transformers", ["--models=huge"], "unknown model size"),
    ("vs_transformers", ["--steps=0"], "--steps must be at least 1"),
    ("memory_plan", ["--dtype=float16"], "choose bfloat16"),
    ("memory_plan", ["--models=tiny", "--seq_len=4096"], "exceeds the tiny model's context"),
])
def test_report_bad_flags_are_user_errors(report, flags, message):
    with pytest.raises(UserError, match=message):
        speed.main([report, *flags])


def test_a_recipe_trial_trains_its_planned_steps_down_to_min_lr(tmp_path, capsys):
    """A trial is a shortened default run: its length is planned from the measured step cost, and the
    learning rate reaches MIN_LR at its last step, as in a --max_minutes run."""
    from benchmarks import recipe

    trial = "tiny model=tiny seq_len=32 batch_size=4 vocab_size=300 compile=false"
    assert recipe.main([f"--trials={trial}", "--budgets=3", f"--out_dir={tmp_path}",
                        f"--data_root={tmp_path / 'data'}", "--threads=1"]) == 0
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["steps"] == row["planned_steps"] > 2 + recipe.MEASURE_STEPS
    assert row["end_lr"] == pytest.approx(row["min_lr"]) and row["val_bpb"] > 0
    assert "tiny" in capsys.readouterr().out
