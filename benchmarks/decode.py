"""
Decode speed: tokens/s of our engine (eager and compiled, fp32 and int8) against transformers' generate (its
default dynamic cache, and a static cache with torch.compile), greedy, the same checkpoint and prompt for all.
With --llamacpp, llama.cpp too at batch 1 (the CPU inference anchor): this checkpoint's f32 and q8_0 GGUF
exports, to set beside our fp32 and int8, in the same threads. With --draft=DIR also speculative decoding at
batch 1 (eager, the draft's guesses checked by the target).

    python text_generator.py --benchmark --checkpoint=DIR     # the same as:
    python speed_optimizations_2025.py decode --checkpoint=DIR
    python speed_optimizations_2025.py decode --checkpoint=DIR --llamacpp   # node + tests/llamacpp installed
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from checkpoint import resolve_checkpoint
from cli import UserError, parse_flags, pick_device, run_main, settings_block
from engine import Engine
from sampling import SamplingParams
from speculative import DraftStats, speculative_stream

CHECKPOINT = "out"  # the checkpoint to measure (a run's OUT_DIR or a checkpoint directory)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
NEW_TOKENS = 128  # tokens decoded per row (end tokens are ignored, so every row decodes them all)
PROMPT = "The quick brown fox jumps over the lazy dog"  # the prompt of every row
LLAMACPP = False  # also llama.cpp f32 and q8_0 at batch 1 (node-llama-cpp's prebuilt CPU build, tests/llamacpp)
THREADS = 0  # CPU threads of every row, llama.cpp's included; 0 = torch's default (1 is steadier on a busy machine)
DRAFT = ""  # a draft checkpoint (same tokenizer): adds speculative decoding rows at batch 1
DRAFT_TOKENS = 4  # guesses per round of speculative decoding
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

LLAMACPP_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "llamacpp" / "greedy.mjs"
LLAMACPP_INSTALL = "cd tests/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install"


class LlamaCpp:
    """A GGUF file loaded once in llama.cpp (a node process fed one greedy request per line), so a timed call
    is the prompt and the new tokens alone, like our engine's. Flash attention off and an f32 KV cache: the
    settings under which its tokens match transformers' (tests/test_llamacpp.py)."""

    def __init__(self, gguf: Path, threads: int):
        self.process = subprocess.Popen(["node", str(LLAMACPP_SCRIPT), f"--model={gguf}", f"--threads={threads}",
                                         "--stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def generate(self, ids: list[int], new_tokens: int) -> list[int]:
        self.process.stdin.write(json.dumps({"ids": ids, "new_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp ended (exit code {self.process.wait()}); see its error above")
        return json.loads(line)["new_ids"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def llamacpp_runs(path: Path, stack: ExitStack) -> dict[str, LlamaCpp]:
    """The checkpoint exported by export_model.py as f32 and q8_0 GGUF files into a temporary folder, each
    loaded in llama.cpp; everything goes away when `stack` closes."""
    import export_model

    if not shutil.which("node") or not (LLAMACPP_SCRIPT.parent / "node_modules" / "node-llama-cpp").is_dir():
        raise UserError(f"--llamacpp needs node and node-llama-cpp: {LLAMACPP_INSTALL}", "Export errors")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="decode-gguf-")))
    runs = {}
    for kind in ("f32", "q8_0"):
        gguf = folder / f"{kind}.gguf"
        export_model.main([f"--checkpoint={path}", "--format=gguf", f"--gguf_type={kind}", f"--out={gguf}"])
        runs[f"llama.cpp {kind}"] = LlamaCpp(gguf, torch.get_num_threads())
        stack.callback(runs[f"llama.cpp {kind}"].close)
    return runs

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
              prompt_text: str = PROMPT, llamacpp: bool = False, draft: str = "",
              draft_tokens: int = DRAFT_TOKENS) -> int:
    """Greedy, `new_tokens` new tokens per row (end tokens ignored, so every row decodes them all), the
    same checkpoint and prompt for every row: ours eager/compiled x fp32/int8, and transformers' generate
    with its default dynamic cache and with a static cache + torch.compile; llama.cpp at batch 1 if asked."""
    path = resolve_checkpoint(checkpoint)
    with ExitStack() as stack:
        llama = llamacpp_runs(path, stack) if llamacpp else {}
        return measure(path, device, batch_sizes, new_tokens, prompt_text, llama, draft, draft_tokens)


def measure(path: Path, device: str, batch_sizes: tuple[int, ...], new_tokens: int, prompt_text: str,
            llama: dict[str, LlamaCpp], draft: str, draft_tokens: int) -> int:
    from transformers import AutoModelForCausalLM, CompileConfig

    engines = {(q, c): Engine(path, device, "float32", q, c, max(batch_sizes))
               for q in (None, "int8") for c in (False, True)}
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(pick_device(device)).eval()
    hf.generation_config.eos_token_id = None
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    static = {"cache_implementation": "static", "compile_config": compile_config}
    hf_runs = {"transformers eager": {}, "transformers static cache + compile": static}
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
        if batch == 1:
            runs.update({name: lambda run=run: run.generate(prompt, new_tokens) for name, run in llama.items()})
        if draft and batch == 1:
            target, draft_engine = Engine(path, device, "float32"), Engine(draft, device, "float32")
            stats = DraftStats()
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
    if llama:
        print(llamacpp_summary(rows, engines, llama, prompt, params))
    if draft:
        print(f"speculative: the draft's guesses kept {stats.acceptance:.0%} ({stats.accepted} of {stats.proposed})")
    return 0


def llamacpp_summary(rows: list[tuple], engines: dict, llama: dict[str, LlamaCpp], prompt: list[int],
                     params: SamplingParams) -> str:
    """Ours over llama.cpp at the same precision (batch 1), and whether the greedy tokens are the same."""
    speed = {name: s for batch, name, s, _ in rows if batch == 1}
    lines = []
    for kind, ours in (("f32", "fp32"), ("q8_0", "int8")):
        want = engines[None if ours == "fp32" else "int8", False].generate([prompt], [params])[0].token_ids
        got = llama[f"llama.cpp {kind}"].generate(prompt, len(want))
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        ratios = ", ".join(f"{mode} {speed[f'ours {mode} {ours}'] / speed[f'llama.cpp {kind}']:.2f}x"
                           for mode in ("eager", "compiled"))
        lines.append(f"ours {ours} / llama.cpp {kind} tokens/s at batch 1: {ratios}; greedy tokens "
                     + ("the same" if same is None else f"first differ at token {same} of {len(want)}"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    return benchmark(cfg["checkpoint"], cfg["device"], new_tokens=cfg["new_tokens"], prompt_text=cfg["prompt"],
                     llamacpp=cfg["llamacpp"], draft=cfg["draft"], draft_tokens=cfg["draft_tokens"])


if __name__ == "__main__":
    run_main(main)
