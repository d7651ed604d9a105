"""One torchrun process on one GPU with an NCCL process group, for tests/test_gpu.py: the same seeded tiny model and
batch trained three times with the training script's own train_step (bf16 autocast, 2 micro-batches a step,
clipping): plain, wrapped by distributed.replicate (DDP) and by distributed.shard (FSDP2, bf16 weights). Their
losses, and whether the FSDP2 model and its optimizer state gather whole, go to the JSON file named by argv[1].
(NCCL takes one process per GPU, and with one process the script itself wraps nothing: so one GPU runs this.)"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import distributed  # noqa: E402
import gpu_training_optimized as train  # noqa: E402
import modern_llm  # noqa: E402
from muon_optimizer import build_optimizer  # noqa: E402

STEPS = 6


def trained(wrap, batches: list, device: torch.device) -> tuple[modern_llm.LLM, object, list[float]]:
    torch.manual_seed(0)
    model = modern_llm.LLM(modern_llm.model_preset("tiny")).to(device)
    module = wrap(model)  # before the optimizer: FSDP2 turns the parameters into shards
    optimizer = build_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    return model, optimizer, [train.train_step(module, optimizer, scaler, micro, autocast, 1.0)[0] for micro in batches]


def sharded(model: modern_llm.LLM) -> modern_llm.LLM:
    distributed.shard(model, torch.bfloat16)
    return model


def main(result: Path) -> None:
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    vocab = modern_llm.model_preset("tiny").vocab_size
    tokens = torch.randint(0, vocab, (2, 4, 65), generator=torch.Generator().manual_seed(0)).to(device)
    batches = [[(m[:, :-1], m[:, 1:]) for m in tokens]] * STEPS  # one batch again and again: the loss must fall

    _, _, plain = trained(lambda model: model, batches, device)
    _, _, ddp = trained(lambda model: distributed.replicate(model, device), batches, device)
    model, optimizer, fsdp = trained(sharded, batches, device)
    shards = {name: p.full_tensor().cpu() for name, p in model.named_parameters()}
    state = distributed.whole_optimizer_state(model, optimizer)
    whole = distributed.whole_model(model)
    result.write_text(json.dumps({
        "backend": dist.get_backend(), "plain": plain, "ddp": ddp, "fsdp": fsdp,
        "gathered_weights_equal_shards": all(torch.equal(p, shards[n]) for n, p in whole.named_parameters()),
        "parameter_names": sorted(n for n, _ in whole.named_parameters()),
        "optimizer_state_names": sorted(state["adamw"]["state"])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
