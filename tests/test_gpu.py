"""The GPU paths, on a CUDA GPU: `pytest -m gpu` selects these tests, and where PyTorch sees no CUDA GPU each one
skips, saying so. `python speed_optimizations_2025.py gpu` runs them, then measures (benchmarks/gpu.py).

Training (gpu_training_optimized.main, as the command line calls it): bf16 steps compiled with max-autotune
(what COMPILE_MODE=auto picks on CUDA) equal eager ones within bf16's rounding; a resumed run is exact in bf16
and in fp16 with its GradScaler, and the CUDA RNG state comes back as saved; running out of GPU memory is one
line naming the knobs and the last checkpoint; the log has NVML's figures and a data-sheet MFU; DDP and FSDP2
(bf16) train as one process under torchrun with NCCL. Decoding (engine.Engine, fp32): eager on CUDA
gives the CPU's greedy tokens, and compiled, CUDA graphs and int8 compiled give eager's. The tiny model
throughout: these prove the paths are right, the report measures them.

Two tests run on any machine: the report reads the training script's memory prediction line, and without
CUDA the report command is one line saying a GPU is needed.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch._inductor.config
import torch._inductor.utils
from torch._dynamo.utils import counters

import benchmarks.gpu as gpu_report
import checkpoint
import cli
import gpu_training_optimized as train
import modern_llm
import training_state
from conftest import ROOT
from engine import Engine
from muon_optimizer import build_optimizer
from test_distributed import data_root, free_port, losses, weights  # noqa: F401 (data_root: a fixture)
from test_distributed import flags as cpu_flags
from test_generator import GREEDY, engine, prompts, sharp_checkpoint  # noqa: F401 (fixtures)

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU: PyTorch sees none here (torch.cuda.is_available() is False)"


def gpu(test):
    """A test of a GPU path: marked `gpu`, and skipped with the reason where there is no CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason=NO_CUDA)(test))


def flags(data_root, out, *extra) -> list[str]:
    """test_distributed's 6 tiny steps (2 micro-batches of 4 rows, a checkpoint at step 3) on the GPU, in the dtype
    --dtype=auto picks there (bf16, or fp16 + GradScaler before Ampere); later flags win."""
    return cpu_flags(data_root, out, "--device=cuda", "--dtype=auto", "--batch_size=4", "--min_lr=3e-4", *extra)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# Training


@gpu
def test_bf16_steps_compiled_with_max_autotune_equal_eager(data_root, tmp_path, capsys):
    """--compile=true with COMPILE_MODE=auto: max-autotune on CUDA (Triton kernels tuned, CUDA graphs). Caches off,
    so the kernels really are tuned here. Also: bf16 is --dtype=auto's choice on Ampere+ and TF32 is on."""
    assert train.main(flags(data_root, tmp_path / "eager")) == 0
    capsys.readouterr()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        assert train.main(flags(data_root, tmp_path / "compiled", "--compile=true")) == 0
    log = capsys.readouterr().out
    assert "needs Triton" not in log and "| compile True |" in log, log[-2000:]
    # every frame compiled (a compiler error would have fallen back to eager silently), and matmuls were tuned,
    # where Inductor tunes them: GPUs of 68 SMs or more (not a 3060's 28 or a 4070 Ti's 60)
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters["frames"])
    if torch._inductor.utils.is_big_gpu(0):
        assert counters["inductor"]["select_algorithm_autotune"] > 0, dict(counters["inductor"])
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert f"| cuda {'bfloat16' if bf16 else 'float16'} |" in log
    assert torch.backends.cuda.matmul.allow_tf32 == (torch.cuda.get_device_capability() >= (8, 0))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [s for s, _ in eager] == list(range(1, 7))
    assert [l for _, l in compiled] == pytest.approx([l for _, l in eager], rel=2e-2)  # bf16: 8 mantissa bits


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resume_on_cuda_is_exact(data_root, tmp_path, dtype):
    """6 steps straight, or 3, a checkpoint, and 3 more resumed: the same weights and losses, bit for bit. In fp16
    the GradScaler's scale is saved and restored with the rest; the CUDA RNG state is restored as saved."""
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(flags(data_root, straight, f"--dtype={dtype}")) == 0
    assert train.main(flags(data_root, split, f"--dtype={dtype}", "--stop_after=3")) == 0
    assert train.main(flags(data_root, split, f"--dtype={dtype}", "--resume=auto")) == 0
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max().item())
    assert losses(straight) == losses(split)

    saved = split / "checkpoint-3"
    state = torch.load(saved / training_state.TRAINING_STATE, weights_only=True)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    assert (state["scaler"].get("scale", 0) > 0) == (dtype == "float16")  # a disabled scaler saves nothing
    model = checkpoint.load_model(saved, "cuda")
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    torch.cuda.manual_seed_all(12345)  # another state, which restore must replace
    training_state.restore(saved, model, optimizer, scaler)
    assert torch.equal(torch.cuda.get_rng_state(), state["rng"]["cuda"][0])
    if dtype == "float16":
        assert scaler.get_scale() == state["scaler"]["scale"]


@gpu
def test_out_of_memory_is_one_line_naming_the_knobs_and_the_last_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    """A real CUDA out-of-memory error in the 4th step (step 3, after checkpoint-3 was saved): one line, exit 2,
    the checkpoint intact."""
    real_step, calls = train.train_step, []

    def step_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            torch.empty(2 * torch.cuda.get_device_properties(0).total_memory, dtype=torch.uint8, device="cuda")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_that_runs_out)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        cli.run_main(train.main, flags(data_root, out))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert errors == [f"error: out of GPU memory at step 3: lower --batch_size (raise --grad_accum to keep the "
                      "tokens per step), lower --seq_len, set --activation_checkpointing=true or use "
                      f"--optimizer=muon; the last checkpoint is {out / 'checkpoint-3'} (see README: Out of memory)"]
    assert "Traceback" not in err
    checkpoint.load_model(out / "checkpoint-3")


@gpu
def test_the_log_has_nvml_figures_and_a_data_sheet_mfu(data_root, tmp_path, capsys):
    """Every LOG_INTERVAL steps a line with the GPU's utilisation, temperature and power (nvidia-ml-py, in
    requirements.txt); each step's MFU against the data sheet's dense peak where the GPU is in cli's table."""
    out = tmp_path / "out"
    assert train.main(flags(data_root, out, "--log_interval=2")) == 0
    log = capsys.readouterr().out
    assert re.search(r"step 2: cpu \d+% \| ram .* \| gpu \d+% \d+C \d+ W", log), log[-2000:]
    mfu = [r["mfu"] for r in metrics(out) if "loss" in r]
    assert len(mfu) == 6 and all(0 < m < 1 for m in mfu), mfu
    _, source = cli.peak_flops(torch.device("cuda"), "bf16")
    if cli.datasheet_flops(torch.cuda.get_device_name()):
        assert "data sheet" in source


@gpu
def test_ddp_and_fsdp2_in_bf16_train_as_one_gpu_under_torchrun_with_nccl(tmp_path):
    """torchrun with one process on the one GPU (NCCL takes one process per GPU; with one process the script
    itself wraps nothing): tests/nccl_worker.py wraps with the script's distributed.replicate and distributed.shard
    and trains with its train_step. DDP over one process changes nothing; FSDP2 computes with bf16 weights, so
    its losses match within bf16's rounding; the whole model and optimizer state come back gathered."""
    result = tmp_path / "nccl.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                          f"--master_port={free_port()}", str(ROOT / "tests" / "nccl_worker.py"), str(result)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["backend"] == "nccl"
    assert r["ddp"] == pytest.approx(r["plain"], rel=1e-5)
    assert r["fsdp"] == pytest.approx(r["plain"], rel=2e-2)
    assert r["fsdp"][-1] < r["fsdp"][0]  # it learns
    assert r["gathered_weights_equal_shards"] and r["optimizer_state_names"] == r["parameter_names"]


# -----------------------------------------------------------------------------
# Decoding


@gpu
def test_eager_decoding_on_cuda_gives_the_cpu_tokens(sharp_checkpoint, engine, prompts, monkeypatch):
    """fp32 (TF32 off) and int8, greedy, four prompts of different lengths in one batch; the CPU engine's tokens
    are transformers' (tests/test_generator.py)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    params = [GREEDY] * len(prompts)
    assert Engine(sharp_checkpoint, "cuda", "float32").generate(prompts, params) == engine.generate(prompts, params)
    cpu_int8 = Engine(sharp_checkpoint, "cpu", "float32", "int8")
    cuda_int8 = Engine(sharp_checkpoint, "cuda", "float32", "int8")
    assert cuda_int8.generate(prompts, params) == cpu_int8.generate(prompts, params)


DECODE_PATHS = {  # name: (the engine, its eager twin); compiled on CUDA is replayed as a CUDA graph
    "compiled (CUDA graphs)": (lambda p: Engine(p, "cuda", "float32", compile=True),
                               lambda p: Engine(p, "cuda", "float32")),
    "int8 compiled": (lambda p: Engine(p, "cuda", "float32", "int8", True),
                      lambda p: Engine(p, "cuda", "float32", "int8")),
}


@gpu
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_compiled_decode_paths_give_eager_greedy_tokens(sharp_checkpoint, prompts, path, monkeypatch):
    """In fp32 with TF32 off (the training tests turned it on in this process): the same tokens, token for token.
    (In bf16 a compiled kernel rounds differently from eager and greedy choices drift apart after a few tokens, as
    they do on a CPU: equal tokens are fp32's promise, not bf16's.)"""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    make, make_eager = DECODE_PATHS[path]
    params = [GREEDY] * len(prompts)
    counters.clear()
    fast = make(sharp_checkpoint)
    assert fast.generate(prompts, params) == make_eager(sharp_checkpoint).generate(prompts, params)
    assert fast.generate(prompts[::-1], params) == make_eager(sharp_checkpoint).generate(prompts[::-1], params)
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters["frames"])
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped (the log says why)"


# -----------------------------------------------------------------------------
# The report command: the line it reads, and its refusal where there is no GPU


def test_the_report_reads_the_training_scripts_memory_prediction(capsys):
    """benchmarks/gpu.py takes each preset's predicted peak from the line the training script prints: if that
    line changes, this fails here rather than the report saying "unknown" on the first GPU."""
    cfg = {"batch_size": 4, "seq_len": 64, "optimizer": "adamw", "activation_checkpointing": False, "parallel": "auto"}
    train.plan_memory(cfg, set(), modern_llm.model_preset("tiny"), torch.device("cpu"), "cpu", None, train.World())
    found = gpu_report.prediction(capsys.readouterr().out)
    assert 0 < found["predicted_gib"] < found["budget_gib"], found


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU: the report runs instead of refusing")
def test_gpu_report_without_cuda_is_one_line_asking_for_a_gpu():
    run = subprocess.run([sys.executable, "speed_optimizations_2025.py", "gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: a CUDA GPU is needed") and run.stderr.strip().count("\n") == 0
    assert run.stderr.strip().endswith("(see README: Checking a GPU)")
