"""
What is each training speed technique worth on THIS machine? One model, one batch, every technique alone and
all together against an eager fp32 baseline, side by side in one run, so the figures compare like with like.

    python speed_optimizations_2025.py                 # `small` model on CPU (~5 min), 125m on a GPU
    python speed_optimizations_2025.py --quick         # tiny model, about a minute: does every row run here?
    python speed_optimizations_2025.py --rows=baseline --rows=transformers   # only some rows
    python speed_optimizations_2025.py vs_transformers   # a report: vs_transformers, memory_plan, decode, muon, recipe, ...

A row is a training step (forward, backward, optimizer): warm-up steps, then the median of timed steps. The table
(tokens/s, speed-up over the baseline, forward+backward and optimizer time, peak memory, MFU) is printed and
written to OUT/<device>.md, .json and .png. A technique that does not apply on this device says why instead of
a number. Each technique is a function below whose docstring says why it helps, when it does not, and what it
measured on the reference machine (2-core AMD EPYC Zen 5 CPU, `small` model, batch 8 x 256).

Every other measurement of the project is a report in benchmarks/, run as `python speed_optimizations_2025.py
REPORT [flags]` (REPORTS below; `REPORT --help` lists its flags).
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import json
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import modern_llm as ml
from checkpoint import hf_config
from cli import (UserError, check_output_path, device_name, parse_flags, peak_flops, pick_device, run_main,
                 settings_block)

MODEL = "small"  # size preset from modern_llm.PRESETS (a GPU run uses 125m unless given)
DEVICE = "auto"  # auto (cuda when available), cuda or cpu
BATCH_SIZE = 8  # rows per optimizer step
SEQ_LEN = 256  # tokens per row (a GPU run uses 1024 unless given)
WARMUP_STEPS = 2  # untimed steps first: compilation, autotuning, allocator warm-up
STEPS = 5  # timed steps per row; the table shows the median
GRAD_ACCUM = 4  # the accumulation row splits BATCH_SIZE into this many micro-batches
LR = 3e-4  # learning rate of every optimizer (the speed does not depend on it)
WEIGHT_DECAY = 0.1  # weight decay of every optimizer
QUICK = False  # tiny model, batch 4 x 64, 1 warm-up + 3 timed steps: about a minute, to see that all rows run
ROWS = []  # measure only these rows (repeatable, names as in the table's first column); empty: all
OUT = "out/speed"  # folder for <device>.md, <device>.json and <device>.png
SEED = 0  # the same weights and tokens for every row
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

# The other reports: `python speed_optimizations_2025.py NAME [flags]` runs benchmarks/<module>.py's main.
REPORTS = {"decode": "benchmarks.decode", "serving": "benchmarks.serving", "tokenization": "benchmarks.tokenization",
           "muon": "benchmarks.muon", "gpu": "benchmarks.gpu", "vs_transformers": "benchmarks.vs_transformers",
           "memory_plan": "benchmarks.memory_plan", "recipe": "benchmarks.recipe"}

# Constants a GPU run or --quick sets unless the user gave them on the command line.
GPU_DEFAULTS = {"model": "125m", "seq_len": 1024}
QUICK_DEFAULTS = {"model": "tiny", "batch_size": 4, "seq_len": 64, "warmup_steps": 1, "steps": 3}


# -----------------------------------------------------------------------------
# What a row changes, and the machine it runs on


@dataclass
class Setup:
    """One row's departures from the baseline (eager fp32, foreach AdamW, PyTorch's choice of attention kernel)."""
    autocast: bool = False  # bf16 autocast
    compile_mode: str | None = None  # torch.compile mode, None for eager
    optimizer: str = "foreach"  # foreach or fused (torch AdamW), muon (muon_optimizer.py)
    sdpa: SDPBackend | None = None  # force one attention kernel
    checkpointing: bool = False  # activation checkpointing
    grad_accum: int = 1  # micro-batches per optimizer step, same tokens per step
    tf32: bool = False  # TF32 tensor cores for fp32 matmuls
    transformers: bool = False  # transformers' LlamaForCausalLM instead of our model

    @property
    def precision(self) -> str:
        """Which peak the MFU is taken against: the matmuls run in bf16, tf32 or fp32."""
        return "bf16" if self.autocast else "tf32" if self.tf32 else "fp32"


@dataclass
class Bench:
    """Everything shared by the rows of one run."""
    device: torch.device
    cfg: ml.ModelConfig
    model_name: str
    batch_size: int
    seq_len: int
    warmup_steps: int
    steps: int
    grad_accum: int
    lr: float
    weight_decay: float
    seed: int
    peak_flops: dict[str, float]  # precision -> FLOP/s
    peak_source: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def tf32_capable(self) -> bool:
        return self.cuda and torch.cuda.get_device_capability(self.device)[0] >= 8


# -----------------------------------------------------------------------------
# The techniques. Each returns the Setup of its row, or a string saying why it does not apply here.


def baseline(bench: Bench) -> Setup | str:
    """Eager fp32 with foreach AdamW: what a plain PyTorch training loop does. Every speed-up is against this."""
    return Setup()


def bf16_autocast(bench: Bench) -> Setup | str:
    """BF16 autocast runs matmuls and attention in bfloat16 while weights, grads and optimizer state stay fp32.

    Why it helps: bf16 matmuls run at 2x (CPU with AVX512-BF16/AMX) to 16x (GPU tensor cores) the fp32 rate and
    move half the bytes; saved activations are half the size. When it does not: weights, grads and AdamW state
    (16 bytes/parameter) are unchanged, so "50% less memory" holds only for activations; CPUs without bf16
    instructions emulate it and get slower. Measured here: 1.5x-2.2x faster, 13% less peak memory.
    """
    return Setup(autocast=True)


def compile_default(bench: Bench) -> Setup | str:
    """torch.compile (default mode) traces the model and fuses the elementwise work (RMSNorm, RoPE, SwiGLU, the
    loss) into generated kernels, so activations make fewer trips through memory.

    Why it helps: a small or memory-bound model spends much of its time in those elementwise ops and the kernel
    launches between them. When it does not: large matmul-bound models (little left to fuse), and short runs,
    because compilation costs ~30 s on CPU (minutes with max-autotune) before the first step.
    Measured here: 1.1x-1.4x faster, 30% less peak memory (fused ops keep fewer activations for backward).
    """
    return Setup(compile_mode="default")


def compile_max_autotune(bench: Bench) -> Setup | str:
    """torch.compile mode="max-autotune" also benchmarks several matmul/attention kernel configurations (Triton
    templates) and captures CUDA graphs, removing launch overhead.

    Why it helps: on a GPU with a small batch, launch overhead and a poorly shaped cuBLAS choice can cost 10-30%.
    When it does not: compile time grows to minutes; on CPU there are no Triton kernels to tune, so it is
    measured on CUDA only.
    """
    if not bench.cuda:
        return "CUDA only: max-autotune tunes GPU (Triton) kernels and captures CUDA graphs"
    return Setup(compile_mode="max-autotune")


def fused_adamw(bench: Bench) -> Setup | str:
    """AdamW(fused=True) updates every parameter in one kernel per step instead of a handful of foreach kernels
    over lists of tensors (or one loop iteration per parameter without foreach).

    Why it helps: the update reads and writes 16 bytes per parameter several times; fusing it reads them once.
    When it does not: the optimizer step is a small share of a step with a large batch (the 10-20% claim is of
    the optimizer step, not of training), and the gain shrinks as tokens per step grow. Fused AdamW exists on
    CPU too in PyTorch 2.4+. Measured here: the optimizer step 2.6-2.9x faster (9 vs 26 ms), the whole
    step 1.0x-1.2x (the optimizer is ~2% of a 2,048-token step).
    """
    return Setup(optimizer="fused")


def muon(bench: Bench) -> Setup | str:
    """Muon (muon_optimizer.py) orthogonalises the momentum of each block matrix with 5 Newton-Schulz
    iterations in bf16; embeddings and norms keep AdamW.

    Why it can help: it reaches a given loss in fewer steps (~1.35x fewer in the modded-nanoGPT speedrun), and
    keeps one state tensor per matrix instead of AdamW's two. What it costs: Newton-Schulz on an m x n matrix
    (m <= n) is about 30*m*m*n FLOPs a step, against 6*m*n per token for the training itself, so the optimizer
    adds ~5*m/tokens-per-step of the step's matmul work: ~1.5% at d=768 with 2^18 tokens per step, but as much
    as the whole forward+backward at this table's 2,048. The table shows time per step only; fewer steps to
    the same loss is muon_optimizer.py's own benchmark. Measured here: 0.7x-0.8x of AdamW's step speed.
    """
    try:
        import muon_optimizer  # noqa: F401
    except ImportError as e:
        return f"muon_optimizer.py cannot be imported ({e})"
    return Setup(optimizer="muon")


def sdpa_flash(bench: Bench) -> Setup | str:
    """FlashAttention computes softmax(QK^T)V in tiles that fit in fast memory, never writing the T x T scores.

    Why it helps: attention memory grows with T instead of T^2 and the scores never travel to main memory. When
    it does not: at short sequences attention is a small part of the step; on GPU it needs fp16/bf16 inputs
    (an fp32 model falls back to another kernel). PyTorch has a CPU flash kernel too.
    """
    return Setup(sdpa=SDPBackend.FLASH_ATTENTION)


def sdpa_efficient(bench: Bench) -> Setup | str:
    """The memory-efficient (xformers-style) kernel: tiled like flash, also takes fp32 and arbitrary masks.

    Why it helps: the fallback when flash cannot run (fp32, a mask), still without T x T scores in memory.
    When it does not: usually somewhat slower than flash where flash applies. CUDA only.
    """
    if not bench.cuda:
        return "CUDA only: PyTorch has no memory-efficient attention kernel for CPU"
    return Setup(sdpa=SDPBackend.EFFICIENT_ATTENTION)


def sdpa_cudnn(bench: Bench) -> Setup | str:
    """cuDNN's fused attention, fastest on Hopper (H100/H200) in recent PyTorch.

    When it does not: older GPUs and some shapes are refused, and the row then says so. CUDA only.
    """
    if not bench.cuda:
        return "CUDA only: cuDNN attention is an NVIDIA GPU kernel"
    return Setup(sdpa=SDPBackend.CUDNN_ATTENTION)


def sdpa_math(bench: Bench) -> Setup | str:
    """The reference "math" attention: matmul, softmax, matmul, with the T x T scores in memory (and K/V
    repeated for grouped-query attention). It is what a hand-written attention does, and the kernel the
    others are measured against: expect it slower and larger, more so as the sequence grows. Measured here
    (CPU, T=256): 18% more peak memory than flash; the speed difference was within this machine's noise.
    """
    return Setup(sdpa=SDPBackend.MATH)


def activation_checkpointing(bench: Bench) -> Setup | str:
    """Activation checkpointing keeps only each block's input during the forward pass and recomputes the block
    during backward.

    Why it helps: activation memory drops from all blocks' intermediates to one block's, so a larger batch or
    model fits. What it costs: one more forward pass per block, ~30% more compute (a slower step, never a
    faster one); the MFU column counts only the model's own FLOPs. Measured here: 0.84x-1.0x speed, 48% less
    peak memory.
    """
    return Setup(checkpointing=True)


def gradient_accumulation(bench: Bench) -> Setup | str:
    """Gradient accumulation: the same tokens per optimizer step, as GRAD_ACCUM smaller micro-batches.

    Why use it: the effective batch a recipe needs, on a GPU that fits only a smaller one. What it costs:
    smaller matmuls run less efficiently and there are more kernel launches, while the optimizer step is paid
    once either way. The row shows that overhead against the one-shot batch. Measured here (4 micro-batches
    of 2 rows): ~1.0x speed, 53% less peak memory.
    """
    if bench.batch_size % bench.grad_accum:
        return f"--batch_size={bench.batch_size} does not split into --grad_accum={bench.grad_accum} micro-batches"
    return Setup(grad_accum=bench.grad_accum)


def tf32(bench: Bench) -> Setup | str:
    """TF32 runs fp32 matmuls on tensor cores with a 10-bit mantissa (torch.set_float32_matmul_precision("high")).

    Why it helps: up to 8x the fp32 matmul rate on Ampere and later, with no code change and fp32 storage.
    When it does not: pre-Ampere GPUs and CPUs have no TF32; under bf16 autocast the matmuls are bf16 already.
    """
    if not bench.tf32_capable():
        return f"needs an NVIDIA GPU of the Ampere generation or later; this is {device_name(bench.device)}"
    return Setup(tf32=True)


def all_together(bench: Bench) -> Setup | str:
    """Everything that speeds up a step, at once: bf16 autocast, torch.compile (default mode: max-autotune's
    compile time is too long for everyday runs), fused AdamW, TF32 where the GPU has it, PyTorch's own choice
    of attention kernel. Activation checkpointing and accumulation are left out: they trade speed for memory.
    Measured here: 1.5x-2.2x faster, 48% less peak memory.
    """
    return Setup(autocast=True, compile_mode="default", optimizer="fused", tf32=bench.tf32_capable())


def transformers_llama(bench: Bench) -> Setup | str:
    """transformers' LlamaForCausalLM with the same config and weights, eager fp32, foreach AdamW: the outside
    reference for our own baseline row (they should be equally fast: same math, same kernels). The loss is
    computed the same way for both (their built-in loss shifts the labels, a little different work).
    Measured here: 0.98x-1.04x of our eager model, the same peak memory.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install transformers)"
    return Setup(transformers=True)


# (name typed with --rows, label in the table, technique)
TECHNIQUES: list[tuple[str, str, Callable[[Bench], Setup | str]]] = [
    ("baseline", "eager fp32, foreach AdamW", baseline),
    ("bf16", "BF16 autocast", bf16_autocast),
    ("compile", "torch.compile (default)", compile_default),
    ("max-autotune", "torch.compile (max-autotune)", compile_max_autotune),
    ("fused-adamw", "fused AdamW", fused_adamw),
    ("muon", "Muon (muon_optimizer.py)", muon),
    ("sdpa-flash", "SDPA flash", sdpa_flash),
    ("sdpa-efficient", "SDPA memory-efficient", sdpa_efficient),
    ("sdpa-cudnn", "SDPA cuDNN", sdpa_cudnn),
    ("sdpa-math", "SDPA math", sdpa_math),
    ("checkpointing", "activation checkpointing", activation_checkpointing),
    ("grad-accum", "gradient accumulation", gradient_accumulation),
    ("tf32", "TF32 matmuls", tf32),
    ("all", "all together", all_together),
    ("transformers", "transformers LlamaForCausalLM, eager fp32", transformers_llama),
]


# -----------------------------------------------------------------------------
# Building a row's model and optimizer


class TransformersLoss(nn.Module):
    """transformers' model behind our forward(idx, targets) -> loss, so both models do the same work per step."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)


def transformers_twin(model: ml.LLM) -> nn.Module:
    """LlamaForCausalLM with our model's config (through the same config.json fields) and weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_model = LlamaForCausalLM(LlamaConfig(**hf_config(model.cfg)))
    missing, unexpected = hf_model.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is the embedding
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: {missing} {unexpected}")
    return TransformersLoss(hf_model)


def build_model(bench: Bench, setup: Setup) -> nn.Module:
    torch.manual_seed(bench.seed)  # every row starts from the same weights
    model = ml.LLM(bench.cfg)
    model.activation_checkpointing = setup.checkpointing
    if setup.transformers:
        model = transformers_twin(model)
    return model.to(bench.device).train()


def build_optimizer(bench: Bench, model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "muon":
        import muon_optimizer

        # its AdamW half unfused, like the baseline's, so the difference is Muon's own
        return muon_optimizer.build_optimizer(model, "muon", bench.lr, bench.weight_decay, fused=False)
    return torch.optim.AdamW(model.parameters(), lr=bench.lr, weight_decay=bench.weight_decay,
                             foreach=kind == "foreach", fused=kind == "fused")


class Float32Precision:
    """torch.set_float32_matmul_precision for the duration of a row, then back (TF32 is a global switch)."""

    def __init__(self, precision: str):
        self.precision = precision

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


# -----------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One row's model, optimizer and micro-batches, taking training steps."""

    def __init__(self, bench: Bench, setup: Setup, x: torch.Tensor, y: torch.Tensor):
        self.bench, self.setup = bench, setup
        self.model = build_model(bench, setup)
        self.opt = build_optimizer(bench, self.model, setup.optimizer)
        self.runnable = torch.compile(self.model, mode=setup.compile_mode) if setup.compile_mode else self.model
        self.batches = list(zip(x.chunk(setup.grad_accum), y.chunk(setup.grad_accum)))

    def step(self) -> tuple[float, float]:
        """One optimizer step over the micro-batches: (forward+backward seconds, optimizer seconds)."""
        setup, device = self.setup, self.bench.device
        with Float32Precision("high" if setup.tf32 else "highest"):
            t0 = time.perf_counter()
            for x, y in self.batches:
                kernel = sdpa_kernel(setup.sdpa) if setup.sdpa is not None else nullcontext()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.autocast), kernel:
                    loss = self.runnable(x, y) / len(self.batches)
                loss.backward()
            sync(device)
            t1 = time.perf_counter()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            sync(device)
        return t1 - t0, time.perf_counter() - t1

    def peak_bytes(self) -> int:
        """Peak memory of one step, this row's tensors alone (nothing else may be alive on a GPU)."""
        if self.bench.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.bench.device)
            self.step()
            return torch.cuda.max_memory_allocated(self.bench.device)
        return cpu_peak_bytes(self.step, self.model, self.opt)


def optimizer_state_bytes(opt) -> int:
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def cpu_peak_bytes(step: Callable[[], object], model: nn.Module, opt) -> int:
    """Peak bytes of CPU tensors during one step: what lives before it (weights, optimizer state; the grads were
    freed by zero_grad) plus the highest point of the step's own allocations."""
    before = sum(p.nbytes for p in model.parameters()) + optimizer_state_bytes(opt)
    return before + allocations(step)[0]


def allocations(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """(the highest point, the change at the end), in bytes, of the memory allocated while fn() runs: on CUDA
    from torch.cuda's counters; on CPU the running sum of the allocations and frees the profiler records
    (CPU PyTorch has no max_memory_allocated, and the process's peak RSS would count the allocator's cache and
    everything measured before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def measure(bench: Bench, setup: Setup, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Warm-up steps, then timed steps, each right after a step of a baseline twin, then the peak memory.

    The speed-up is the median of the per-pair ratios, so a machine whose load changes during the run (a shared
    or thermally throttled one) moves both sides of each ratio alike; tokens/s is the row's own median.
    """
    row = Runner(bench, setup, x, y)
    base = Runner(bench, Setup(), x, y) if setup != Setup() else None
    t0 = time.perf_counter()
    for _ in range(bench.warmup_steps):
        row.step()
    warmup_s = time.perf_counter() - t0  # compilation shows here
    for _ in range(bench.warmup_steps if base else 0):
        base.step()
    times, ratios = [], []
    for _ in range(bench.steps):
        reference = sum(base.step()) if base else None
        times.append(row.step())
        ratios.append(reference / sum(times[-1]) if base else 1.0)
    del base  # measure the row's memory alone
    gc.collect()
    peak = row.peak_bytes()
    tokens_per_s = bench.batch_size * bench.seq_len / statistics.median(fb + o for fb, o in times)
    flops = ml.flops_per_token(bench.cfg, bench.seq_len) * tokens_per_s
    return {
        "tokens_per_s": tokens_per_s,
        "speedup": statistics.median(ratios),
        "fwd_bwd_ms": 1000 * statistics.median(fb for fb, _ in times),
        "optimizer_ms": 1000 * statistics.median(o for _, o in times),
        "peak_mib": peak / 2**20,
        "mfu": flops / bench.peak_flops[setup.precision],
        "warmup_s": warmup_s,
    }


def run_row(bench: Bench, technique: Callable[[Bench], Setup | str], x, y) -> dict:
    """A technique's figures, or {"note": why not}: a technique that fails here (no C++ compiler for
    torch.compile, a kernel refused, out of memory) is a result for this machine, not the end of the run."""
    setup = technique(bench)
    if isinstance(setup, str):
        return {"note": setup}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            return measure(bench, setup, x, y)
        except Exception as e:  # noqa: BLE001 (reported in the row, see docstring)
            why = [str(w.message).strip().splitlines()[0] for w in seen if "not used because" in str(w.message)]
            return {"note": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                            + (f" ({'; '.join(why[:2])})" if why else "")}
        finally:
            gc.collect()
            torch._dynamo.reset()  # drop compiled graphs: each compile row starts from scratch
            if bench.cuda:
                torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Peaks for MFU


def peaks(device: torch.device, quick: bool) -> tuple[dict[str, float], str]:
    """(precision -> FLOP/s, where the figures come from) for every precision a row may compute in."""
    n = 1024 if quick else 2048
    found = {p: peak_flops(device, p, n) for p in ("fp32", "tf32", "bf16")}
    return {p: flops for p, (flops, _) in found.items()}, found["bf16"][1]


# -----------------------------------------------------------------------------
# Report: Markdown, JSON, PNG

COLUMNS = ["row", "technique", "tokens/s", "vs baseline", "fwd+bwd ms", "optimizer ms", "peak MiB",
           "memory vs baseline", "MFU", "note"]


def add_memory_ratios(rows: list[dict]) -> None:
    """Peak memory of each measured row against the baseline's (the first row)."""
    base = rows[0]
    for r in rows:
        if "peak_mib" in r and "peak_mib" in base:
            r["memory_ratio"] = r["peak_mib"] / base["peak_mib"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "tokens_per_s" in r:
            memory = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else "n/a"  # n/a: the baseline failed
            cells = [f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['fwd_bwd_ms']:,.1f}",
                     f"{r['optimizer_ms']:,.1f}", f"{r['peak_mib']:,.0f}", memory, f"{100 * r['mfu']:.1f}%"]
        else:
            cells = ["n/a"] + [""] * 6
        lines.append("| " + " | ".join([r["row"], r["technique"], *cells, r.get("note", "")]) + " |")
    return "\n".join(lines)


def header(meta: dict) -> str:
    peaks = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in meta["peak_flops"].items())
    return (f"{meta['date']}, {meta['device_name']} ({meta['device']}, {meta['threads']} threads), "
            f"torch {meta['torch']}, transformers {meta['transformers']}: model `{meta['model']}` "
            f"({meta['params'] / 1e6:.1f}M params), batch {meta['batch_size']} x {meta['seq_len']} tokens, median "
            f"of {meta['steps']} steps after {meta['warmup_steps']} warm-up. MFU against peak TFLOP/s {peaks} "
            f"({meta['peak_source']}).")


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "speedup" in r]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(measured) + 1.2))
    ax.barh([r["row"] for r in measured][::-1], [r["speedup"] for r in measured][::-1], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("training tokens/s relative to the eager fp32 baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, meta: dict, rows: list[dict]) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / meta["device"]
        table = markdown_table(rows)
        stem.with_suffix(".md").write_text(header(meta) + "\n\n" + table + "\n", encoding="utf-8")
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
        draw(rows, stem.with_suffix(".png"))
    except OSError as e:
        raise UserError(f"cannot write the report to --out={out}: {e.strerror or e}", "Performance") from None
    return stem


# -----------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def speed_device(name: str) -> torch.device:
    """The report measures CUDA GPUs and CPUs (its rows are CUDA's and the CPU's techniques)."""
    if name != "auto" and name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device={name!r}: choose auto, cpu or cuda", "Performance")
    device = pick_device(name)
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def make_bench(cfg: dict, device: torch.device) -> Bench:
    for name in ("batch_size", "seq_len", "steps", "grad_accum"):
        if cfg[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {cfg[name]}", "Performance")
    if cfg["warmup_steps"] < 0:
        raise UserError(f"--warmup_steps must be 0 or more, got {cfg['warmup_steps']}", "Performance")
    model_cfg = ml.model_preset(cfg["model"])
    if cfg["seq_len"] > model_cfg.max_seq_len:
        raise UserError(f"--seq_len={cfg['seq_len']} exceeds the {cfg['model']} model's context of "
                        f"{model_cfg.max_seq_len}", "Performance")
    peak, source = peaks(device, cfg["quick"])
    return Bench(device=device, cfg=model_cfg, model_name=cfg["model"], batch_size=cfg["batch_size"],
                 seq_len=cfg["seq_len"], warmup_steps=cfg["warmup_steps"], steps=cfg["steps"],
                 grad_accum=cfg["grad_accum"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], seed=cfg["seed"],
                 peak_flops=peak, peak_source=source)


def selected_techniques(names: list[str]):
    known = [name for name, _, _ in TECHNIQUES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown --rows {', '.join(unknown)}; choose from {', '.join(known)}", "Performance")
    # the baseline always runs: every other row is read against it
    return [t for t in TECHNIQUES if not names or t[0] in names or t[0] == "baseline"]


def main(argv: list[str]) -> int:
    if argv and argv[0] in REPORTS:
        return importlib.import_module(REPORTS[argv[0]]).main(argv[1:])
    cfg, given = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    device = speed_device(cfg["device"])
    defaults = {**(GPU_DEFAULTS if device.type == "cuda" else {}), **(QUICK_DEFAULTS if cfg["quick"] else {})}
    cfg.update({k: v for k, v in defaults.items() if k not in given})
    techniques = selected_techniques(cfg["rows"])
    check_output_path(cfg["out"], "--out")
    bench = make_bench(cfg, device)

    g = torch.Generator().manual_seed(bench.seed)
    tokens = torch.randint(0, bench.cfg.vocab_size, (bench.batch_size, bench.seq_len + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    rows = []
    for name, label, technique in tqdm(techniques, desc="techniques", unit="row"):
        rows.append({"row": name, "technique": label, **run_row(bench, technique, x, y)})
    add_memory_ratios(rows)

    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device.type,
            "device_name": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": package_version("transformers"), "model": bench.model_name, "config": asdict(bench.cfg),
            "params": ml.count_params(bench.cfg), "batch_size": bench.batch_size, "seq_len": bench.seq_len,
            "steps": bench.steps, "warmup_steps": bench.warmup_steps, "grad_accum": bench.grad_accum,
            "flops_per_token": ml.flops_per_token(bench.cfg, bench.seq_len), "peak_flops": bench.peak_flops,
            "peak_source": bench.peak_source}
    stem = write_report(Path(cfg["out"]), meta, rows)
    print(header(meta) + "\n\n" + markdown_table(rows))
    print(f"\nwrote {stem}.md, {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    run_main(main)
