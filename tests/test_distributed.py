"""Several processes with torchrun (gloo, 2 CPU processes, the tiny model, fp32, compile off): DDP with 2 x 4 rows
trains exactly as 1 process with 8 rows, also on two machines rehearsed on this one (two torchrun agents meeting
at a c10d rendezvous), FSDP2 exactly as DDP, a checkpoint saved by 2 processes resumes in 1 and one saved by 1
resumes in 2, and a rank that stops answering makes the run stop with a clear error instead of hanging. Each torchrun launch costs ~10-25 s here (two Python processes importing torch on 2 shared cores),
so the runs are module fixtures that several tests compare."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import gpu_training_optimized as train
import modern_llm
import prepare_data
import training_state
from cli import UserError
from conftest import ROOT, SAMPLE_TEXT

SCRIPT = str(ROOT / "gpu_training_optimized.py")
FAULT_ENV = "TRAIN_FAULT"  # read by tests/faulty_rank.py
STEPS = 6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small corpus, tokenized once; every run finds it through --dataset and --data_root."""
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text("\n\n".join(SAMPLE_TEXT))
    prepare_data.prepare(str(root / "corpus.txt"), root, 300)
    return root


def flags(data_root, out, *extra) -> list[str]:
    """6 steps of the tiny model in fp32, 2 micro-batches a step (so DDP's no_sync is used), AdamW (whose moments
    the FSDP test compares; the cpu preset's is Muon); later flags win."""
    return [f"--dataset={data_root / 'corpus.txt'}", f"--data_root={data_root}", "--vocab_size=300", "--model=tiny",
            "--optimizer=adamw",
            f"--out_dir={out}", "--seq_len=32", "--grad_accum=2", "--dtype=float32", "--compile=false",
            "--max_minutes=0", f"--max_steps={STEPS}", "--warmup_steps=2", "--lr=3e-3", "--eval_steps=2",
            "--eval_interval=1000", "--checkpoint_interval=3", "--log_interval=1000", *extra]


def in_this_process(args: list[str]) -> int:
    """One process, as torchrun's do (OMP_NUM_THREADS=1): 2 threads fighting the others for 2 cores crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(args)
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, fault: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """The script under `torchrun --nproc_per_node=2`, as a user starts it (torch.distributed.run is torchrun).
    With a fault, tests/faulty_rank.py runs it instead, making its last rank fail that way at step 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = SCRIPT
    if fault:
        env[FAULT_ENV], script = fault, str(ROOT / "tests" / "faulty_rank.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def two_machines(logs, *args, timeout: int = 300) -> list[tuple[int, str]]:
    """The script on two machines rehearsed on this one: two torchrun agents, started alike as on two machines
    (one process each), meeting through a c10d rendezvous on 127.0.0.1. Each agent's (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=rehearsal", SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = [logs / f"agent{i}.log" for i in range(2)]
    agents = []
    for path in paths:  # to files, not pipes: neither agent can block on a full pipe
        with open(path, "w") as log:
            agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [a.wait(timeout=timeout) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    return [(code, path.read_text()) for code, path in zip(codes, paths)]


def launched(*args) -> subprocess.CompletedProcess:
    run = torchrun(*args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a, b, atol=2e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (k, (wa[k] - wb[k]).abs().max().item())


def losses(out) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def one_process(data_root, tmp_path_factory):
    """The reference: 1 process, micro-batch 8."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert in_this_process(flags(data_root, out, "--batch_size=8")) == 0
    return out


@pytest.fixture(scope="module")
def ddp(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    return out, launched(*flags(data_root, out, "--batch_size=4", "--parallel=ddp"))


@pytest.fixture(scope="module")
def fsdp(data_root, tmp_path_factory):
    """FSDP2, stopped after step 3 (its checkpoint-3 is compared with DDP's and resumed in 1 process)."""
    out = tmp_path_factory.mktemp("fsdp") / "out"
    return out, launched(*flags(data_root, out, "--batch_size=4", "--parallel=fsdp", "--stop_after=3"))


def test_ddp_2_processes_x_4_rows_train_as_1_process_x_8_rows(one_process, ddp):
    out, run = ddp
    assert_same_weights(out, one_process)
    ours, reference = losses(out), losses(one_process)
    assert [s for s, _ in ours] == list(range(1, STEPS + 1))  # rank 0 alone writes the metrics: no line twice
    assert [l for _, l in ours] == pytest.approx([l for _, l in reference], abs=1e-5)  # the mean of both processes
    assert run.stdout.count("\ndone:") == 1  # rank 0 alone prints
    assert "2 processes, ddp" in run.stdout
    assert "global batch 16 = micro-batch 4 x accumulation 2 x 2 processes" in run.stdout


@pytest.mark.slow
def test_two_machines_of_one_process_train_and_resume_as_one_process(data_root, one_process, tmp_path):
    """--nnodes=2: 2 x 4 rows on two "machines" to step 3, a checkpoint, then resumed by one process of 8 rows
    (the same global batch of 16): the weights of one process with 8 rows all along."""
    out = tmp_path / "out"
    agents = two_machines(tmp_path, *flags(data_root, out, "--batch_size=4", "--stop_after=3"))
    assert [code for code, _ in agents] == [0, 0], "\n".join(log[-3000:] for _, log in agents)
    log = "".join(log for _, log in agents)  # rank 0 prints, on whichever agent the rendezvous made node 0
    assert log.count("2 processes, ddp") == 1
    assert "global batch 16 = micro-batch 4 x accumulation 2 x 2 processes" in log
    assert_same_weights(out / "checkpoint-3", one_process / "checkpoint-3")
    resumed = tmp_path / "resumed"
    assert in_this_process(flags(data_root, resumed, "--batch_size=8", f"--resume={out / 'checkpoint-3'}")) == 0
    assert_same_weights(resumed, one_process)


def test_fsdp_trains_as_ddp_and_saves_whole_checkpoints(ddp, fsdp):
    (ddp_out, _), (fsdp_out, run) = ddp, fsdp
    assert "2 processes, fsdp" in run.stdout
    assert_same_weights(fsdp_out / "checkpoint-3", ddp_out / "checkpoint-3")
    states = [torch.load(o / "checkpoint-3" / training_state.TRAINING_STATE, weights_only=True)["optimizer"]["adamw"]
              for o in (fsdp_out, ddp_out)]
    assert states[0]["state"].keys() == states[1]["state"].keys() == weights(ddp_out / "checkpoint-3").keys()
    for name, moments in states[0]["state"].items():  # gathered from the shards: whole tensors, DDP's values
        assert torch.allclose(moments["exp_avg"], states[1]["state"][name]["exp_avg"], rtol=0, atol=1e-6), name


def test_a_checkpoint_of_2_processes_resumes_in_1(data_root, one_process, fsdp, tmp_path):
    out = tmp_path / "out"
    assert in_this_process(flags(data_root, out, "--batch_size=8", f"--resume={fsdp[0] / 'checkpoint-3'}")) == 0
    assert_same_weights(out, one_process)


def test_resuming_with_another_global_batch_says_so(data_root, fsdp, tmp_path, capsys):
    """Resumed in 1 process, the saved micro-batch of 4 makes a global batch of 8 instead of 16."""
    out = tmp_path / "out"
    assert in_this_process(flags(data_root, out, "--max_steps=4", f"--resume={fsdp[0] / 'checkpoint-3'}")) == 0
    assert "note: the global batch was 16 sequences and is now 8" in capsys.readouterr().out


def test_a_checkpoint_of_1_process_resumes_in_2_with_fsdp(data_root, one_process, tmp_path):
    out = tmp_path / "out"
    run = launched(*flags(data_root, out, "--batch_size=4", "--parallel=fsdp",
                          f"--resume={one_process / 'checkpoint-3'}"))
    assert f"resuming from {one_process / 'checkpoint-3'} at step 3" in run.stdout
    assert_same_weights(out, one_process)


@pytest.mark.parametrize("fault", ["hang", "exit"])
def test_a_lost_rank_stops_the_run_with_a_clear_error(data_root, tmp_path, fault):
    """"hang": rank 1 stops answering at step 2, rank 0 gives up after --dist_timeout with one line, torchrun
    stops rank 1. "exit": rank 1 dies at step 2 and torchrun stops rank 0. Either way: an exit, not a hang."""
    t = time.time()
    run = torchrun(*flags(data_root, tmp_path / "out", "--batch_size=4", "--dist_timeout=5"), fault=fault)
    assert run.returncode != 0
    assert time.time() - t < 180
    assert "ChildFailedError" in run.stderr  # torchrun's summary, naming the failed rank
    if fault == "hang":
        assert "error: rank 0 lost the other processes" in run.stderr
        assert 'gpu_training_optimized.py", line' not in run.stderr  # one line, no traceback


def test_auto_shards_only_what_a_whole_gpu_cannot_hold(monkeypatch):
    """The memory plan under torchrun: DDP while a whole model fits one (24 GiB) GPU, FSDP when only sharding
    fits, and FSDP refused in fp16 (it needs bf16 or fp32)."""
    monkeypatch.setattr(train, "memory_budget", lambda device, preset: (24 * train.GiB, "a 24 GiB GPU"))

    def plan(model: str, processes: int, dtype=torch.bfloat16) -> str:
        cfg = {"batch_size": 4, "seq_len": 512, "optimizer": "adamw", "activation_checkpointing": False,
               "parallel": "auto"}
        world = train.World(0, 0, processes, processes)
        train.plan_memory(cfg, set(), modern_llm.model_preset(model, vocab_size=32000), torch.device("cuda"),
                          "rtx4090", dtype, world)
        return cfg["parallel"]

    assert plan("730m", 2) == "ddp"
    assert plan("3b", 8) == "fsdp"  # ~48 GiB of weights, gradients and AdamW state: 1/8 of it per GPU
    with pytest.raises(UserError, match="this run needs about"):
        plan("3b", 1)
    with pytest.raises(UserError, match="bf16 or fp32"):
        plan("3b", 8, torch.float16)
