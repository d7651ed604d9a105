"""
A training run's length: the learning-rate schedule, and the time budget (--max_minutes) that sets its length.

A budgeted run does not know its length in advance, and the time a step takes changes while it trains (the first
steps are slow, other jobs start and stop). So the budget is planned again before every step from the time left
and the step time measured over the last steps, and the schedule follows the plan without a jump: each step
moves the decay on by the share of what is left of it, so the learning rate reaches MIN_LR at the last step
whatever the length became.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

STEP_WINDOW = 10  # the step time is the mean of the last this many steps, so the plan follows a machine's load
WARM_STEPS = 2  # a session's first steps (compilation, cold caches) are not timed
WRITE_BYTES_PER_S = 200e6  # a checkpoint not timed yet is planned at this disk speed
SAMPLE_TOKENS = (32, 100)  # tokens of an evaluation's sample, and of the sample printed at the end


class Schedule:
    """Learning rate / LR, step by step: a linear warm-up over WARMUP_STEPS, then cosine or warmup-stable-decay
    from LR down to MIN_LR at the last step. With a fixed length the decay's progress at `step` is
    (step - warmup) / (length - 1 - warmup). When the length changes (a time budget re-planned), each step moves
    the progress on by (1 - progress) / (steps left), which is the same for a fixed length; so the learning rate
    never rises after the warm-up, changes little from step to step while the plan does, and is MIN_LR at the last
    step of the final plan."""

    def __init__(self, cfg: dict, length: int | None, progress: float = 0.0):
        self.cfg = cfg
        self.length = length  # None: a time budget not measured yet (the decay waits at the peak)
        self.progress = progress  # share of the decay done at the last step taken (saved with a checkpoint)

    def factor(self, step: int) -> float:
        """The factor for `step`: call it once per step, in order, since it moves the decay on."""
        cfg, warmup = self.cfg, self.cfg["warmup_steps"]
        if step < warmup:
            return (step + 1) / warmup
        if step > warmup and self.length is not None:
            left = self.length - step  # this step and those after it
            self.progress = 1.0 if left <= 1 else self.progress + (1 - self.progress) / left
        floor, p = cfg["min_lr"] / cfg["lr"], self.progress
        if cfg["schedule"] == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        stable = 1 - cfg["decay_fraction"]
        return 1.0 if p < stable else 1 - (1 - floor) * (p - stable) / cfg["decay_fraction"]


def fit_to_length(cfg: dict, given: set[str], length: int, step: int = 0) -> list[str]:
    """Settings the user did not give, fitted to a run of `length` steps; returns a note for each change. A warm-up
    of half the run or more is cut to a tenth of it (once past step 0 not below the step reached, so the rate
    keeps rising, unless the run ends so soon that only ending the warm-up now lets the last step reach MIN_LR);
    before the run, an interval longer than the run is cut to a quarter of it."""
    changes = {}
    warmup = cfg["warmup_steps"]
    if "warmup_steps" not in given and 2 * warmup >= length and step < warmup:
        cut = min(max(length // 10, step + 1 if step else 0), length - 2)  # the last step decays, at least
        changes["warmup_steps"] = (max(0, cut), f"a warm-up of half the {length} steps or more leaves the "
                                                "learning rate no time to decay")
    for name in ("eval_interval", "checkpoint_interval", "log_interval"):
        if not step and name not in given and cfg[name] > length:
            changes[name] = max(1, length // 4), f"every {cfg[name]} steps never comes in a {length}-step run"
    notes = [f"note: --{name}={value} instead of {cfg[name]}: {why}" for name, (value, why) in changes.items()]
    cfg.update({name: value for name, (value, _) in changes.items()})
    return notes


class TimeBudget:
    """The length of a --max_minutes run, planned again at each step: the last step such that the steps, the
    evaluations and checkpoints among them, and the final evaluation, checkpoint, model and sample all fit in the
    time left. `clock` is time.time, or a test's clock."""

    def __init__(self, seconds: float, cfg: dict, checkpoint_bytes: int, start: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg, self.clock = cfg, clock
        self.seconds = seconds
        self.deadline = (clock() if start is None else start) + seconds  # start: when the script started
        self.steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self.seen = 0  # steps timed or skipped as warm-up in this session
        self.eval_s: float | None = None  # the last evaluation, its sample included
        self.sample_s = 0.0  # the last evaluation's sample alone
        self.save_s = checkpoint_bytes / WRITE_BYTES_PER_S  # until a checkpoint is timed
        self.end: int | None = None  # the last plan
        self.evals = 0  # evaluations timed in this session

    def timed(self, what: str, seconds: float) -> None:
        """What the loop measured: a "step" (its whole iteration, evaluation and save left out), an "eval", its
        "sample" or a "save"."""
        if what == "step":
            self.seen += 1
            if self.seen > WARM_STEPS:
                self.steps.append(seconds)
        else:
            self.evals += what == "eval"
            setattr(self, f"{what}_s", seconds)

    def end_seconds(self, per_step: float) -> float:
        """The final evaluation, checkpoint, model (its weights: about half a checkpoint's time, whose optimizer
        state is twice their size, but with the same small files) and the longer sample."""
        cfg = self.cfg
        forward = per_step * cfg["eval_steps"] / (3 * cfg["grad_accum"]) + self.sample_s  # at the training speed
        evaluation = self.eval_s if self.eval_s is not None else forward
        if self.evals == 1 and per_step:  # the session's first also paid one-time costs (imports, first drawing)
            evaluation = min(evaluation, forward)
        return evaluation + 1.5 * self.save_s + self.sample_s * SAMPLE_TOKENS[1] / SAMPLE_TOKENS[0]

    def plan(self, step: int, cap: int | None) -> int | None:
        """The step to end at (the run ends before taking it); None while the step time is not measured yet."""
        if self.end == step:  # the step just taken was planned as the last
            return step
        if not self.steps:  # not measured yet: end only if the final evaluation and saves would overrun already
            return step if self.clock() + self.end_seconds(0.0) >= self.deadline else cap
        per_step = sum(self.steps) / len(self.steps)
        left = self.deadline - self.clock() - self.end_seconds(per_step)

        def cost(end: int) -> float:  # the steps from here to `end` and the evaluations and checkpoints among them
            evals = (end - 1) // self.cfg["eval_interval"] - step // self.cfg["eval_interval"]
            saves = (end - 1) // self.cfg["checkpoint_interval"] - step // self.cfg["checkpoint_interval"]
            return (end - step) * per_step + evals * (self.eval_s or 0.0) + saves * self.save_s

        lo, hi = step, step + max(1, int(left / per_step) + 1)  # cost(lo) == 0 <= left; cost(hi) > left
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid)
        # One more step at least, taken as the last (at MIN_LR): when the time ran out sooner than planned, the run
        # ends one step late rather than with the learning rate above its floor.
        self.end = min(max(lo, step + 1), cap) if cap else max(lo, step + 1)
        return self.end


def run_length(cfg: dict, typed: set[str], resumed: bool, saved: dict, params: int,
               started: float) -> tuple[Schedule, TimeBudget | None]:
    """The schedule (a resumed run continues its progress) and, for a --max_minutes run, its budget from the
    script's start: a resumed run has what its sessions left of it, or a new one if --max_minutes is typed again;
    --max_steps typed alone on resuming makes it a run of that length."""
    schedule = Schedule(cfg, cfg["max_steps"] or None, saved.get("lr_progress", 0.0))  # a budget's cap, if any
    if resumed and "max_steps" in typed and "max_minutes" not in typed:
        cfg["max_minutes"] = 0.0  # saved so: the run has that length from now on
    if not cfg["max_minutes"]:
        return schedule, None
    seconds = 60 * cfg["max_minutes"]
    if resumed and "max_minutes" not in typed and saved.get("budget_left_s") is not None:
        seconds = saved["budget_left_s"]
    return schedule, TimeBudget(seconds, cfg, 3 * 4 * params, start=started)  # fp32 weights and two moments
