"""gpu_training_optimized.py: the loss falls, resume is exact, a kill at any instant leaves a loadable
checkpoint, gradient accumulation and torch.compile change nothing, and bad inputs are one-line errors that
leave OUT_DIR as it was. Tiny model, fp32, one thread (two threads fighting other processes for two cores run
~10x slower here)."""

import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import cli
import gpu_training_optimized as train
import modern_llm
import prepare_data
import schedule as schedule_module
import training_state
from conftest import ROOT

VOCAB = 512
SCRIPT = str(ROOT / "gpu_training_optimized.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The built-in corpus with a 512-token BPE, prepared once; every run finds it through --data_root."""
    root = tmp_path_factory.mktemp("data")
    prepare_data.prepare("builtin", root, VOCAB)
    return root


def flags(data_root, out, *extra) -> list[str]:
    """A tiny fp32 eager run; later flags override earlier ones."""
    return ["--model=tiny", f"--vocab_size={VOCAB}", f"--data_root={data_root}", f"--out_dir={out}",
            "--batch_size=4", "--seq_len=32", "--dtype=float32", "--compile=false", "--max_minutes=0",
            "--eval_steps=2", "--warmup_steps=5", "--log_interval=1000", "--eval_interval=1000", *extra]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def figures(out) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")} for r in metrics(out)]


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """100 steps of the tiny model with Muon on the built-in corpus (2,048 tokens a step)."""
    out = tmp_path_factory.mktemp("run") / "out"
    code = train.main(flags(data_root, out, "--max_steps=100", "--batch_size=16", "--seq_len=128", "--lr=1e-2",
                            "--optimizer=muon", "--eval_interval=50", "--checkpoint_interval=50", "--eval_steps=4"))
    assert code == 0
    return out


def test_loss_falls_well_below_the_unigram_entropy(trained_run, data_root):
    meta = prepare_data.load_meta(prepare_data.prepare("builtin", data_root, VOCAB))  # the cached folder
    val = np.memmap(os.path.join(meta["data_dir"], "val.bin"), dtype=meta["dtype"], mode="r")
    p = np.bincount(val) / len(val)
    unigram = -(p[p > 0] * np.log(p[p > 0])).sum()  # the best loss without looking at context
    evals = [r for r in metrics(trained_run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 50, 100]
    assert evals[0]["val_loss"] > unigram  # a random model starts above it (about ln 512)
    assert evals[-1]["val_loss"] < 0.85 * unigram, (evals, unigram)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert [s for s, _ in losses(trained_run)] == list(range(1, 101))
    assert (trained_run / "loss.png").stat().st_size > 1000


def test_the_learning_rate_keeps_its_closed_form_with_several_param_groups(trained_run):
    """Muon's and AdamW's param groups share one schedule, moved on once per step: the logged rate is the fixed-
    length cosine over the 100 steps (it decayed ~3x too fast when every group moved the schedule on)."""
    lrs = {r["step"] - 1: r["lr"] for r in metrics(trained_run) if "lr" in r}  # a record's step is the one after
    assert sorted(lrs) == list(range(100))
    peak, floor, warmup = 1e-2, lrs[99] / 1e-2, 5
    for step, lr in lrs.items():
        p = max(0, step - warmup) / (99 - warmup)
        want = (step + 1) / warmup if step < warmup else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr == pytest.approx(peak * want, rel=1e-6), step
    assert floor < 0.5


def test_final_model_is_a_hugging_face_directory(trained_run):
    """OUT_DIR itself holds the final model: transformers loads it and gives our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not any("_orig_mod" in k for k in load_file(trained_run / "model.safetensors"))
    ours = checkpoint.load_model(trained_run)
    theirs = AutoModelForCausalLM.from_pretrained(trained_run)
    tok = AutoTokenizer.from_pretrained(trained_run)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b")])
    torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    names = sorted(p.name for p in checkpoint.list_checkpoints(trained_run))
    assert names == ["checkpoint-100", "checkpoint-50"]  # KEEP_CHECKPOINTS=2


def test_resume_is_bit_exact(data_root, tmp_path):
    common = ("--max_steps=20", "--checkpoint_interval=5", "--eval_interval=10")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(flags(data_root, straight, *common)) == 0
    assert train.main(flags(data_root, split, *common, "--stop_after=10")) == 0
    assert checkpoint.checkpoint_step(checkpoint.list_checkpoints(split)[-1]) == 10
    assert train.main(flags(data_root, split, *common, "--resume=auto")) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(losses(split)) == 20
    assert figures(straight) == figures(split)  # losses, learning rates, gradient norms, evaluations


def test_gradient_accumulation_matches_one_big_batch():
    """2 x 4 micro-batches and 8 x 1 give the same loss, gradient norm and update (SGD: the update is the
    gradient, so fp32 rounding is all that may differ)."""
    torch.manual_seed(0)
    cfg = modern_llm.model_preset("tiny")
    x, y = torch.randint(0, cfg.vocab_size, (2, 8, 32))
    results = []
    for micro in ([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], [(x, y)]):
        torch.manual_seed(1)
        model = modern_llm.LLM(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, norm = train.train_step(model, opt, scaler, micro, torch.autocast("cpu", enabled=False), 0.5)
        results.append((loss, norm, model.state_dict()))
    (l1, n1, w1), (l2, n2, w2) = results
    assert n1 > 0.5  # the clip was active, so clipping is compared too
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)


def test_nan_loss_skips_the_update():
    torch.manual_seed(0)
    model = modern_llm.LLM(modern_llm.model_preset("tiny"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("layers.0.mlp.up_proj.weight")}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (2, 16))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert train.train_step(model, opt, scaler, [(x, x)], torch.autocast("cpu", enabled=False), 1.0) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt.state  # no step was taken


@pytest.mark.slow
def test_compile_matches_eager(data_root, tmp_path):
    few = ("--max_steps=3", "--checkpoint_interval=1000")
    assert train.main(flags(data_root, tmp_path / "eager", *few)) == 0
    assert train.main(flags(data_root, tmp_path / "compiled", *few, "--compile=true")) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 3
    for (s1, l1), (s2, l2) in zip(eager, compiled):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-4)
    saved = load_file(tmp_path / "compiled" / "model.safetensors")
    assert not any("_orig_mod" in k for k in saved)


def start(data_root, out, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, SCRIPT, *flags(data_root, out, *extra)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def newest(out):
    found = checkpoint.list_checkpoints(out) if out.is_dir() else []
    return found[-1] if found else None


def assert_loadable(ckpt) -> int:
    """A complete checkpoint: weights, config, tokenizer and training state all read back."""
    checkpoint.load_model(ckpt)
    prepare_data.load_tokenizer(ckpt)
    state = torch.load(ckpt / training_state.TRAINING_STATE, weights_only=True)
    assert {"optimizer", "scaler", "rng"} <= state.keys()
    return checkpoint.checkpoint_step(ckpt)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_sigterm_saves(data_root, tmp_path):
    out = tmp_path / "out"
    run = ("--max_steps=100000", "--checkpoint_interval=1", "--keep_checkpoints=2", "--resume=auto")
    rng = random.Random(0)
    steps = [0]
    for _ in range(3):  # saves happen every step, so kills land in the middle of saves and prunes too
        proc = start(data_root, out, *run)
        wait_for(lambda: newest(out) and checkpoint.checkpoint_step(newest(out)) > steps[-1], proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        steps.append(assert_loadable(newest(out)))
    assert steps == sorted(steps) and steps[-1] > steps[1]  # each run continued from the one before

    proc = start(data_root, out, *run, "--checkpoint_interval=100000")
    wait_for(lambda: len(losses(out)) >= steps[-1] + 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, output[-2000:]
    assert "--resume=auto" in output
    last = losses(out)[-1][0]
    assert assert_loadable(newest(out)) == last > steps[-1]  # saved at the step it stopped
    assert [s for s, _ in losses(out)] == list(range(1, last + 1))  # no step lost or logged twice

    assert train.main(flags(data_root, out, *run, f"--max_steps={last + 2}")) == 0
    assert checkpoint.checkpoint_step(checkpoint.resolve_checkpoint(out)) == last + 2


BAD_INPUTS = {  # flags -> a piece of the one-line error
    "unknown flag": (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    "wrong type": (["--batch_size=abc"], "expects an integer"),
    "unknown preset": (["--preset=rtx9090"], "rtx9090"),
    "missing dataset": (["--dataset=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    "seq_len above the model's": (["--seq_len=4096"], "maximum of 128"),
    "batch size 0": (["--batch_size=0"], "--batch_size must be positive"),
    "resume, other model shape": (["--model=small", "--resume={run}/checkpoint-100"], "another model"),
    "resume, not a training checkpoint": (["--resume={foreign}"], "no training state"),
    "fresh run over an existing run": (["--resume="], "already holds a training run"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_out_dir_untouched(case, trained_run, data_root, tiny_checkpoint, capsys):
    extra, expected = BAD_INPUTS[case]
    extra = [e.format(run=trained_run, foreign=tiny_checkpoint) for e in extra]
    before = snapshot(trained_run)
    with pytest.raises(SystemExit) as exit:
        cli.run_main(train.main, flags(data_root, trained_run, "--resume=auto", *extra))
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert snapshot(trained_run) == before


def test_bad_input_from_the_command_line(data_root, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, *flags(data_root, tmp_path / "out", "--batch_size=0")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --batch_size must be positive, got 0 (see README: Configuration)"]
    assert not (tmp_path / "out").exists()


def test_memory_plan_turns_on_checkpointing_only_when_needed(monkeypatch):
    """The rtx4070ti preset (730m model) on a 12 GiB card: the plan predicts 11.4 GiB without activation
    checkpointing, so it stays off; with 10 GiB free it is turned on (9.7 GiB predicted), refused when typed off,
    and a batch that cannot fit either way is an error naming --batch_size."""
    cfg = {k.lower(): v for k, v in train._FLAG_DEFAULTS.items()}
    train.apply_preset(cfg, set(), "rtx4070ti")
    model_cfg = modern_llm.model_preset("730m")
    where = (torch.device("cpu"), "rtx4070ti", torch.bfloat16, train.World())  # one process
    monkeypatch.setattr(train, "memory_budget", lambda device, preset: (int(11.5 * train.GiB), "a 12 GiB GPU"))
    train.plan_memory(cfg, set(), model_cfg, *where)
    assert cfg["activation_checkpointing"] is False
    monkeypatch.setattr(train, "memory_budget", lambda device, preset: (int(10 * train.GiB), "10 GiB free"))
    train.plan_memory(cfg, set(), model_cfg, *where)
    assert cfg["activation_checkpointing"] is True
    cfg["activation_checkpointing"] = False
    with pytest.raises(cli.UserError, match="--activation_checkpointing=true"):
        train.plan_memory(cfg, {"activation_checkpointing"}, model_cfg, *where)
    cfg["batch_size"] = 64
    with pytest.raises(cli.UserError, match="lower --batch_size"):
        train.plan_memory(cfg, set(), model_cfg, *where)


def factors(cfg: dict, lengths) -> list[float]:
    """The schedule's factor at each step, the length being lengths[step] when that step is taken."""
    schedule = schedule_module.Schedule(cfg, None)
    out = []
    for step, length in enumerate(lengths):
        schedule.length = length
        out.append(schedule.factor(step))
    return out


def test_schedules():
    """With a fixed length: warm-up, then the closed form, MIN_LR at the last step (step 110 of 111)."""
    cfg = {"warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4, "schedule": "cosine", "decay_fraction": 0.2}
    f = factors(cfg, [111] * 111)
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert factors(cfg, [None] * 60)[50] == 1.0  # a time budget not yet measured holds the peak
    cfg["schedule"] = "wsd"
    f = factors(cfg, [111] * 111)
    assert f[89] == 1.0 and f[100] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_a_replanned_schedule_never_rises_never_jumps_and_ends_at_min_lr(kind):
    """The plan grows (steps got faster), then shrinks (the machine got busy), in jumps of 30%."""
    cfg = {"warmup_steps": 10, "lr": 1.0, "min_lr": 0.1, "schedule": kind, "decay_fraction": 0.5}
    lengths = [None] * 12 + [100] * 20 + [130] * 30 + [90] * 58  # the run ends at step 90
    f = factors(cfg, lengths[:90])
    decay = f[cfg["warmup_steps"]:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert max(a - b for a, b in zip(decay, decay[1:])) < 0.05  # no step drops more than 5% of the range
    assert f[-1] == pytest.approx(0.1)


def test_a_budget_shorter_than_the_warm_up_still_ends_at_min_lr():
    """A machine so busy that the first plan, at step 3, allows 4 steps: the cpu preset's 30-step warm-up (not
    given by the user) ends at once, so the last step is at MIN_LR; a warm-up the user gave is kept."""
    cfg = {"warmup_steps": 30, "lr": 1.0, "min_lr": 0.1, "schedule": "cosine", "decay_fraction": 0.2}
    schedule = schedule_module.Schedule(cfg, None)
    f = [schedule.factor(step) for step in range(3)]
    schedule.length = 4
    assert schedule_module.fit_to_length(cfg, set(), 4, 3) == [
        "note: --warmup_steps=2 instead of 30: a warm-up of half the 4 steps or more leaves the learning rate no "
        "time to decay"]
    f.append(schedule.factor(3))
    assert f[:3] == pytest.approx([1 / 30, 2 / 30, 3 / 30]) and f[3] == pytest.approx(0.1)
    assert schedule_module.fit_to_length(dict(cfg, warmup_steps=30), {"warmup_steps"}, 4, 3) == []


class Clock:
    """A test's time: it moves only when the simulated run spends it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("load", ["idle", "busy"])
def test_time_budget_ends_within_5_percent_with_the_rate_at_min_lr(load):
    """A simulated 6-minute run: slow first steps (compilation), then a machine that is idle, or gets busy and
    calm again; evaluations and checkpoints cost time too. The run, final evaluation and saves included, ends
    within 5% of the budget, and its last step is at MIN_LR."""
    cfg = {"warmup_steps": 30, "lr": 1.0, "min_lr": 0.1, "schedule": "cosine", "decay_fraction": 0.2,
           "eval_interval": 100, "checkpoint_interval": 100, "eval_steps": 10, "grad_accum": 1}
    clock = Clock()
    # the script started 20 s ago (data, set-up); a checkpoint of 150 MB
    budget = schedule_module.TimeBudget(360.0, cfg, checkpoint_bytes=150_000_000, start=clock() - 20, clock=clock)
    schedule, step, lrs = schedule_module.Schedule(cfg, None), 0, []
    eval_s, save_s, sample_s = 4.0, 1.0, 0.5

    def step_seconds(step: int) -> float:
        if step < 3:
            return 12.0  # compiling, cold caches
        if load == "busy":
            return 0.5 if step < 150 else 2.0 if step < 250 else 1.0
        return 0.5

    while True:
        schedule.length = budget.plan(step, None) or schedule.length
        if schedule.length is not None and step >= schedule.length:
            break
        if step % cfg["eval_interval"] == 0:
            clock.now += eval_s + sample_s
            budget.timed("eval", eval_s + sample_s)
            budget.timed("sample", sample_s)
        if step and step % cfg["checkpoint_interval"] == 0:
            clock.now += save_s
            budget.timed("save", save_s)
        lrs.append(schedule.factor(step))
        clock.now += step_seconds(step)
        budget.timed("step", step_seconds(step))
        step += 1
    clock.now += eval_s + sample_s + 1.5 * save_s + sample_s * 100 / 32  # the final evaluation, saves, sample
    used = clock.now - budget.deadline + budget.seconds
    assert abs(used - 360) <= 0.05 * 360, (used, step)
    assert step > 300 if load == "idle" else step > 200
    assert lrs[-1] == pytest.approx(0.1)
    decay = lrs[cfg["warmup_steps"]:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_a_preset_fills_in_only_what_fits(capsys):
    """--model=tiny on the cpu preset: its seq_len (256) is above the tiny model's 128, so it is adapted with a
    note; a warm-up of half the run and intervals longer than it are cut; what the user gave is kept."""
    cfg = {k.lower(): v for k, v in train._FLAG_DEFAULTS.items()}
    cfg.update(model="tiny", max_steps=40)
    train.apply_preset(cfg, {"model", "max_steps"}, "cpu")
    train.fit_settings(cfg, {"model", "max_steps", "checkpoint_interval"}, "tiny", 128)
    out = capsys.readouterr().out
    assert cfg["seq_len"] == 128 and "--seq_len=128 instead of 256: the tiny model's context is 128" in out
    assert cfg["warmup_steps"] == 4 and "--warmup_steps=4 instead of 30" in out
    assert cfg["eval_interval"] == 10 and cfg["checkpoint_interval"] == 100  # the second was given
    cfg = {k.lower(): v for k, v in train._FLAG_DEFAULTS.items()}
    train.apply_preset(cfg, set(), "cpu")
    train.fit_settings(cfg, set(), "small", 256)
    assert capsys.readouterr().out == ""  # the default run fits as it is


def test_settings_are_checked_before_any_data_work(data_root, tmp_path, capsys):
    """A seq_len the tiny model cannot take is refused before the (missing) dataset is even looked at; with
    --max_minutes=0 the cpu preset's max_steps=0 gives way to the default length."""
    with pytest.raises(SystemExit):
        cli.run_main(train.main, flags(data_root, tmp_path / "out", "--seq_len=4096", "--dataset=/no/such.txt"))
    captured = capsys.readouterr()
    assert "--max_steps=2000 instead of the cpu preset's 0" in captured.out
    assert "--seq_len=4096 is above the tiny model's maximum of 128" in captured.err


def test_max_steps_caps_a_budgeted_run_from_the_first_step(data_root, tmp_path):
    out = tmp_path / "out"
    assert train.main(flags(data_root, out, "--max_minutes=5", "--max_steps=5")) == 0
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    assert checkpoint.checkpoint_step(checkpoint.list_checkpoints(out)[-1]) == 5


@pytest.mark.slow
def test_time_budget_holds_and_ends_at_min_lr(data_root, tmp_path, capsys):
    """A real 30-second budget (no step cap): from main()'s start to its end, final evaluation and save included,
    within 5% of the budget; the last step at MIN_LR."""
    out = tmp_path / "out"
    assert train.main(flags(data_root, out, "--max_minutes=0.5", "--max_steps=0", "--min_lr=1e-5",
                            "--checkpoint_interval=200")) == 0
    printed = capsys.readouterr().out
    assert "budget allows about" in printed
    used = float(re.search(r"time budget 30.0 s, used ([\d.]+) s", printed).group(1))
    print(f"planned 30.0 s, used {used:.1f} s")
    assert abs(used - 30) <= 1.5, printed[-2000:]
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) > 20
    assert steps[-1]["lr"] == pytest.approx(1e-5)


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    for step, val_loss in ((10, 3.0), (20, 2.5), (30, None), (40, 2.7), (50, None)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text("{}")
        (ckpt / "model.safetensors").write_bytes(b"")
        (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"global_step": step, "val_loss": val_loss}))
    train.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-40", "checkpoint-50"]
