"""
Decode speed: tokens/s of our engine (eager and compiled, fp32 and int8) against transformers' generate (its
default dynamic cache, and a static cache with torch.compile), greedy, the same checkpoint and prompt for all;
with --draft=DIR also speculative decoding at batch 1 (eager, the draft's guesses checked by the target).

    python text_generator.py --benchmark --checkpoint=DIR     # the same as:
    python speed_optimizations_2025.py decode --checkpoint=DIR
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from checkpoint import resolve_checkpoint
from cli import parse_flags, pick_device, run_main, settings_block
from engine import Engine
from sampling import SamplingParams
from speculative import DraftStats, speculative_stream

CHECKPOINT = "out"  # the checkpoint to measure (a run's OUT_DIR or a checkpoint directory)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
NEW_TOKENS = 128  # tokens decoded per row (end tokens are ignored, so every row decodes them all)
PROMPT = "The quick brown fox jumps over the lazy dog"  # the prompt of every row
DRAFT = ""  # a draft checkpoint (same tokenizer): adds speculative decoding rows at batch 1
DRAFT_TOKENS = 4  # guesses per round of speculative decoding
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

def timed(fns: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Best wall-clock seconds of each function over `rounds` rounds, after one untimed call each (warm-up,
    compilation). Round-robin, so a machine that gets busier or quieter meanwhile affects all of them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def benchmark(checkpoint: str, device: str, batch_sizes: tuple[int, ...] = (1, 8), new_tokens: int = NEW_TOKENS,
              prompt_text: str = PROMPT, draft: str = "", draft_tokens: int = DRAFT_TOKENS) -> int:
    """Greedy, `new_tokens` new tokens per row (end tokens ignored, so every row decodes them all), the
    same checkpoint and prompt for every row: ours eager/compiled x fp32/int8, and transformers' generate
    with its default dynamic cache and with a static cache + torch.compile."""
    from transformers import AutoModelForCausalLM, CompileConfig

    path = resolve_checkpoint(checkpoint)
    engines = {(q, c): Engine(path, device, "float32", q, c, max(batch_sizes))
               for q in (None, "int8") for c in (False, True)}
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(pick_device(device)).eval()
    hf.generation_config.eos_token_id = None
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    hf_runs = {"transformers eager": {},
               "transformers static cache + compile": {"cache_implementation": "static", "compile_config": compile_config}}
    prompt = engines[None, False].tokenizer.encode(prompt_text, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    rows = []
    for batch in batch_sizes:
        ids = torch.tensor([prompt] * batch, device=hf.device)
        runs = {name: lambda extra=extra: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                     max_new_tokens=new_tokens, pad_token_id=0, **extra)
                for name, extra in hf_runs.items()}
        for (q, c), engine in engines.items():
            engine.end_tokens = set()
            runs[f"ours {'compiled' if c else 'eager'} {q or 'fp32'}"] = \
                lambda engine=engine: engine.generate([prompt] * batch, [params] * batch)
        if draft and batch == 1:
            target, draft_engine, stats = Engine(path, device, "float32"), Engine(draft, device, "float32"), DraftStats()
            target.end_tokens = set()
            runs[f"ours speculative eager fp32, {draft_tokens} guesses"] = \
                lambda: list(speculative_stream(target, draft_engine, prompt, params, draft_tokens, stats))
        with torch.inference_mode():
            results = timed(runs)
        base = batch * new_tokens / results["transformers eager"]
        for name, seconds in results.items():
            rows.append((batch, name, batch * new_tokens / seconds, batch * new_tokens / seconds / base))
    cfg = engines[None, False].model.cfg
    print(f"decode tokens/s: {path}, {cfg.n_layer} layers x d={cfg.d_model}, vocab {cfg.vocab_size}, "
          f"{pick_device(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| batch | generator | tokens/s | x transformers eager |\n| --- | --- | --- | --- |")
    for batch, name, speed, ratio in rows:
        print(f"| {batch} | {name} | {speed:,.0f} | {ratio:.2f} |")
    if draft:
        print(f"speculative: the draft's guesses kept {stats.acceptance:.0%} ({stats.accepted} of {stats.proposed})")
    return 0


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    return benchmark(cfg["checkpoint"], cfg["device"], new_tokens=cfg["new_tokens"], prompt_text=cfg["prompt"],
                     draft=cfg["draft"], draft_tokens=cfg["draft_tokens"])


if __name__ == "__main__":
    run_main(main)
