"""
The torchrun side of training: the process group, DDP and FSDP2 wrapping, the few collectives the loop needs,
and whole models and optimizer states gathered for saving.

Without torchrun every function here is a no-op or the identity, so the training script reads the same either
way. Under torchrun: one process per GPU (or CPU process with gloo), rank 0 prints and writes, and a checkpoint
is the same whole file for any number of processes, so a run resumes on another number.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from cli import UserError, run_main
from modern_llm import LLM


class World:
    """This process's place in a torchrun job: rank 0 of 1 without torchrun."""

    def __init__(self, rank: int = 0, local_rank: int = 0, size: int = 1, local_size: int = 1):
        self.rank, self.local_rank, self.size, self.local_size = rank, local_rank, size, local_size


def start_processes(device: torch.device, timeout_s: int) -> tuple[torch.device, World]:
    """Under torchrun (RANK and WORLD_SIZE in the environment): one GPU per process (LOCAL_RANK), the process
    group (NCCL on GPUs, gloo on CPUs) whose collectives give up after `timeout_s`, and stdout silenced on every
    rank but 0, so the run prints once (errors, on stderr, still show from any rank). Else: nothing."""
    env = os.environ
    if int(env.get("WORLD_SIZE", 1)) == 1:
        return device, World()
    world = World(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"]))
    if device.type == "mps":
        raise UserError("torchrun needs CUDA GPUs or CPUs; Apple GPUs train in one process", "Several GPUs")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {world.local_size} processes on this machine but it has "
                            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node={torch.cuda.device_count()}",
                            "Several GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    nccl = device.type == "cuda" and dist.is_nccl_available()  # Windows builds have no NCCL: gloo works, slower
    dist.init_process_group("nccl" if nccl else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if nccl else None)
    if world.rank:
        sys.stdout = open(os.devnull, "w")
    return device, world


def rank0_first(world: World, work):
    """work() on rank 0 first, then on the first process of each other machine, then on the rest: the data is
    prepared once (or once per machine when they do not share the folder) and then reused, never written by
    two processes at once."""
    turn = 0 if world.rank == 0 else 1 if world.local_rank == 0 else 2
    result = None
    for t in range(3 if world.size > 1 else 1):
        if t == turn:
            result = work()
        wait_for_rank0()
    return result


def shard(model: LLM, param_dtype: torch.dtype | None) -> None:
    """FSDP2, in place: each block's weights, gradients and optimizer state split across the processes and
    gathered block by block for its forward and backward (in `param_dtype`, gradients reduced in fp32). Build the
    optimizer after this: the parameters become DTensor shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: embedding (tied head) and final norm


def replicate(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP: a whole model per process, gradients averaged during backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model, on: bool):
    """Averaging the gradients across processes only on the last micro-batch of a step: accumulation
    micro-steps would send the same sum piece by piece (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if on else model.no_sync()
    sharded = getattr(model, "_orig_mod", model)
    if hasattr(sharded, "set_requires_gradient_sync"):
        sharded.set_requires_gradient_sync(on)
    return nullcontext()


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over all processes (x itself in one): losses are measured on each process's own rows."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)  # a sum: gloo has no average
    return x / dist.get_world_size()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is on any: a Ctrl-C that reaches the processes at different steps must
    stop them all at the same one, or the ones still training would wait for the others forever."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(value: int | None, device: torch.device) -> int | None:
    """Rank 0's value on every process (a run length each process would plan from its own clock)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(-1 if value is None else value, device=device)
    dist.broadcast(t, 0)
    return None if t.item() < 0 else int(t.item())


def wait_for_rank0() -> None:
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# Whole models and optimizer states, for checkpoints


def optimizer_parts(optimizer) -> dict:
    """The torch optimizers inside ours by name (Muon+AdamW has two); a checkpoint stores each one's state."""
    return {"muon": optimizer.muon, "adamw": optimizer.adamw} if hasattr(optimizer, "muon") else {"adamw": optimizer}


def is_sharded(model: LLM) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: LLM) -> None:
    """Put FSDP2's weights back in shards, as the optimizer knows them: an evaluation, with no backward, leaves
    the root's embedding and norm gathered."""
    if is_sharded(model):
        model.reshard()


def whole_model(model: LLM) -> LLM | None:
    """The model to save, on rank 0 (None on the others): the model itself, or under FSDP2 a CPU copy gathered
    from the shards (every process must call this: gathering is collective)."""
    if not is_sharded(model):
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not weights:
        return None
    with torch.device("meta"):
        whole = LLM(model.cfg)
    whole.load_state_dict(weights, assign=True)  # takes the gathered tensors as they are: no second copy
    return whole


def whole_optimizer_state(model: LLM, optimizer) -> dict:
    """Each part's state keyed by parameter name, on the CPU, whole (gathered from the shards under FSDP2): the
    same file for any number of processes. Empty on ranks other than 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    reshard(model)
    return {name: get_optimizer_state_dict(model, part, options=options)
            for name, part in optimizer_parts(optimizer).items()}


def load_optimizer_state(model: LLM, optimizer, state: dict) -> None:
    """The inverse of whole_optimizer_state, into any number of processes: each FSDP2 process takes its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    parts = optimizer_parts(optimizer)
    if set(state) != set(parts):
        raise ValueError(f"it holds the state of {' + '.join(state)}, this run uses {' + '.join(parts)}")
    for name, part in parts.items():
        set_optimizer_state_dict(model, part, state[name], options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------


def run_torchrun(main) -> None:
    """run_main for one process of a torchrun job, ending it the way that is reliable with gloo: after a good run
    every process meets the others, closes the process group and leaves with os._exit, which skips an
    interpreter exit that aborts now and then ("terminate called without an active exception") after the work
    is done. A process that lost the others (one died, or did not answer within --dist_timeout) says so in one
    line; torchrun then stops the rest and exits non-zero."""
    code = 1
    try:
        run_main(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # a lost process: NCCL raises a DistError, gloo a RuntimeError naming gloo
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e)):
            print(f"error: rank {os.environ['RANK']} lost the other processes (one stopped, or did not answer "
                  f"within --dist_timeout): {str(e).splitlines()[0]} (see README: torchrun hangs or stops)",
                  file=sys.stderr)
        else:
            traceback.print_exc()
    if code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
