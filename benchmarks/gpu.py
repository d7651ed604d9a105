"""
Checking a GPU: one command that runs every GPU test, rehearses each hardware preset on this GPU, measures
decoding, and writes a markdown report.

    python speed_optimizations_2025.py gpu                        # all of it: meant to take < 8 min on an H100
    python speed_optimizations_2025.py gpu --tests=false --presets=rtx4070ti   # one preset, no tests

1. The GPU tests, `pytest -m gpu` (tests/test_gpu.py): each GPU path against its eager or CPU twin.
2. The memory planner against reality. For each preset: a few real steps of its model and batch, set up by the
   training script itself (its memory plan, and its per-process memory cap, so a big card rehearses the 12 GB
   preset), nothing saved; the peak the script predicted against torch.cuda.max_memory_allocated, and a verdict:
   fits when the steps ran and the allocator's reserved peak stays within the script's budget for that card (the
   card's memory less 0.5 GiB of CUDA context). Each preset runs in a fresh process, so caps and peaks do not
   carry over. The same steps give the speed table: tokens/s and MFU (against the data sheet's dense bf16 peak).
3. Decode tokens/s of text_generator's Engine (eager and compiled, bf16 and int8, batch 1 and 8), greedy, on a
   randomly initialized model with the presets' 32k vocabulary: decode speed depends on the shapes, not on what
   the weights have learned.

Exit code 0 when every test passed and every preset this GPU can rehearse fits, else 1 (a preset for a card with
more memory than this one is listed as not rehearsed); the report is written either way.
"""

from __future__ import annotations

import io
import multiprocessing
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

import torch

import checkpoint
import gpu_training_optimized as train
import modern_llm
import prepare_data
from benchmarks.decode import PROMPT, timed
from cli import UserError, parse_flags, pick_device, pick_dtype, run_main, settings_block
from distributed import World
from engine import Engine
from monitor import GiB
from sampling import SamplingParams

PRESETS = []  # hardware presets to rehearse (repeatable); empty: every GPU preset (rtx3060 rtx4070ti rtx4090 h100)
STEPS = 4  # optimizer steps per preset, all of its micro-batches; the first is not timed (allocator, kernels)
COMPILE = False  # train the presets compiled, as training does by default (max-autotune: minutes more each)
TESTS = True  # run the GPU tests (pytest -m gpu) first
DECODE_MODEL = "125m"  # model size of the decode rows (random weights)
NEW_TOKENS = 128  # tokens decoded per decode row (end tokens ignored, so every row decodes them all)
DATA_ROOT = "data"  # the built-in corpus with the presets' 32k BPE is prepared here once, as training would
OUT = "docs/gpu_report.md"  # the report
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

ROOT = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# 1. The GPU tests


def run_tests(xml: Path) -> tuple[bool, list[dict]]:
    """`pytest -m gpu`, its output shown as it runs; (all passed, one row per test from its JUnit XML)."""
    code = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", f"--junitxml={xml}"],
                          cwd=ROOT).returncode
    rows = []
    for case in ElementTree.parse(xml).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        message = (outcome.get("message") or "").strip().splitlines() if outcome is not None else []
        rows.append({"test": f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}",
                     "outcome": "passed" if outcome is None else {"failure": "failed"}.get(outcome.tag, outcome.tag),
                     "seconds": float(case.get("time", 0)), "message": message[0][:160] if message else ""})
    return code == 0 and bool(rows) and all(r["outcome"] == "passed" for r in rows), rows


# -----------------------------------------------------------------------------
# 2. The presets: memory planner against reality, and training speed


def rehearse_preset(preset: str, data_root: str, steps: int, compile: bool) -> dict:
    """`steps` steps of `preset` as `gpu_training_optimized.py --preset=PRESET` sets them up (main's settings
    steps, then its setup(): data, model, memory plan and cap, optimizer), then its one_step() each step; nothing
    is saved. Meant for a fresh process: the memory cap and the peak are this preset's alone."""
    out_dir = tempfile.mkdtemp(prefix=f"gpu-{preset}-")
    argv = [f"--preset={preset}", "--device=cuda", f"--data_root={data_root}", f"--out_dir={out_dir}",
            f"--max_steps={steps}", "--max_minutes=0", f"--compile={compile}"]
    cfg, typed = parse_flags(train._FLAG_DEFAULTS, argv)
    _, _, fixed = train.settle_settings(cfg, typed)
    device = pick_device(cfg["device"])
    train.apply_preset(cfg, fixed, preset)
    train.validate(cfg)
    dtype = pick_dtype(cfg["dtype"], device)
    printed = io.StringIO()
    row = preset_row(preset)
    try:
        with redirect_stdout(printed):
            run = train.setup(cfg, fixed, typed, None, {}, device, World(), preset, dtype)
            seconds = [train.one_step(run, step)[1] for step in range(steps)]
    except (UserError, torch.OutOfMemoryError) as e:  # the planner refused it, or it ran out of memory
        return {**row, "error": str(e).splitlines()[0], **prediction(printed.getvalue())}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    step_s = statistics.median(seconds[1:] or seconds)
    return {**row, **prediction(printed.getvalue()), "checkpointing": cfg["activation_checkpointing"],
            "vocab": run.model.cfg.vocab_size, "dtype": str(dtype).removeprefix("torch."),
            "allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
            "step_s": step_s, "tokens_per_s": run.tokens_per_step / step_s,
            "mfu": run.flops_per_step / step_s / run.peak_flops if run.peak_flops else None}


def preset_row(preset: str) -> dict:
    s = train.HARDWARE[preset]
    return {"preset": preset, "model": s["model"], "batch": f"{s['batch_size']} x {s['grad_accum']} x {s['seq_len']}"}


def prediction(printed: str) -> dict:
    """The training script's own start-up line: `predicted peak memory P GiB of B GiB (where)`."""
    found = re.search(r"predicted peak memory ([\d.]+) GiB of ([\d.]+) GiB", printed)
    return {"predicted_gib": float(found.group(1)), "budget_gib": float(found.group(2))} if found else {}


def verdict(row: dict) -> str:
    if "not_rehearsed" in row:
        return "not rehearsed: " + row["not_rehearsed"]
    if "crash" in row:
        return "failed: " + row["crash"]
    if "error" in row:
        return "does not fit: " + row["error"].split(":")[0]
    if row.get("budget_gib") is None:
        return "unknown: the script printed no memory prediction"
    if row["reserved_gib"] > row["budget_gib"]:
        return f"does not fit: {row['reserved_gib'] - row['budget_gib']:.1f} GiB above the card's budget"
    return "fits"


def rehearsable(preset: str) -> str | None:
    """Why this GPU cannot rehearse `preset` (it has less memory than the card the preset is for), or None.
    As --preset=auto judges it: 90% of the preset's memory is enough (a 12 GB card reports 11.7 GiB)."""
    have, need = torch.cuda.get_device_properties(0).total_memory / GiB, train.HARDWARE[preset]["memory_gib"]
    return None if need * 0.9 <= have else f"this GPU has {have:.0f} GiB, the preset is for {need} GiB"


def rehearse_in_fresh_process(preset: str, data_root: str, steps: int, compile: bool) -> dict:
    """rehearse_preset in a new interpreter (spawned: CUDA cannot be forked); a crash becomes the row's error."""
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(rehearse_preset, preset, data_root, steps, compile).result()
    except Exception as e:  # a CUDA error, or the process died: the report says so and goes on
        return {**preset_row(preset), "crash": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


# -----------------------------------------------------------------------------
# 3. Decoding


def seconds(engine: Engine, prompt: list[int], batch: int, params: SamplingParams) -> float:
    """The best of a few rounds (after one untimed: compilation), benchmarks/decode.py's way."""
    return timed({"row": lambda: engine.generate([prompt] * batch, [params] * batch)})["row"]


def decode_rows(tokenizer_dir: str, model: str, new_tokens: int) -> list[dict]:
    """Greedy tokens/s of the Engine, eager and compiled, bf16 and int8, batch 1 and 8, the same prompt."""
    tokenizer = prepare_data.load_tokenizer(tokenizer_dir)
    ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = checkpoint.save_checkpoint(modern_llm.LLM(modern_llm.model_preset(model, vocab_size=len(tokenizer))),
                                          Path(tmp) / model, extra=tokenizer.save_pretrained, token_ids=ids)
        for quantize in (None, "int8"):
            for compiled in (False, True):
                engine = Engine(path, "cuda", "bfloat16", quantize, compiled, max_batch_size=8)
                engine.end_tokens = set()
                for batch in (1, 8):
                    name = f"{'compiled' if compiled else 'eager'} {quantize or 'bf16'}"
                    rows.append({"engine": name, "batch": batch,
                                 "tokens_per_s": batch * new_tokens / seconds(engine, prompt, batch, params)})
                del engine  # before the next one is loaded
                torch.cuda.empty_cache()
    return rows


# -----------------------------------------------------------------------------
# The report


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def figure(row: dict, key: str, form: str = "{:.2f}") -> str:
    return form.format(row[key]) if row.get(key) is not None else "n/a"


def tests_section(tests: list[dict] | None) -> list[str]:
    if tests is None:
        return ["Not run (--tests=false)."]
    return [table(["test", "outcome", "seconds", "message"],
                  [[f"`{t['test']}`", t["outcome"], f"{t['seconds']:.1f}", t["message"]] for t in tests])]


def memory_section(meta: dict, presets: list[dict]) -> list[str]:
    how = "compiled (COMPILE_MODE=auto)" if meta["compile"] else "eager (--compile=false)"
    return [f"{meta['steps']} steps of each preset as `gpu_training_optimized.py --preset=NAME` sets it up, {how}, "
            "under the preset's per-process memory cap (none where the card is not larger than the preset). "
            "Predicted: the script's start-up line. Allocated: `torch.cuda.max_memory_allocated`; reserved: the "
            "allocator's peak (`max_memory_reserved`), what must fit. Budget: the card's memory less 0.5 GiB of "
            "CUDA context, as the script plans. Vocabulary: the BPE trained on the built-in corpus (the presets ask "
            "for 32,000; a smaller corpus yields fewer), the same model for prediction and measurement.", "",
            table(["preset", "model", "vocab", "micro-batch x accum x seq", "act. ckpt", "predicted GiB",
                   "allocated GiB", "reserved GiB", "budget GiB", "predicted / allocated", "verdict"],
                  [[p["preset"], p["model"], figure(p, "vocab", "{:,}"), p["batch"], figure(p, "checkpointing", "{}"),
                    figure(p, "predicted_gib"),
                    figure(p, "allocated_gib"), figure(p, "reserved_gib"), figure(p, "budget_gib"),
                    f"{p['predicted_gib'] / p['allocated_gib']:.2f}" if {"predicted_gib", "allocated_gib"} <= p.keys()
                    else "n/a", verdict(p)] for p in presets])]


def speed_section(presets: list[dict]) -> list[str]:
    return ["The same steps: the median step after the first; MFU is model FLOPs (`modern_llm.flops_per_token`) "
            "against the data sheet's dense peak (`cli.GPU_PEAK_TFLOPS`, or a measured matmul for other GPUs).", "",
            table(["preset", "model", "dtype", "tokens/s", "step s", "MFU"],
                  [[p["preset"], p["model"], figure(p, "dtype", "{}"), figure(p, "tokens_per_s", "{:,.0f}"),
                    figure(p, "step_s", "{:.3f}"), figure(p, "mfu", "{:.1%}")] for p in presets])]


def report(meta: dict, tests: list[dict] | None, presets: list[dict], decode: list[dict]) -> str:
    about = (f"{meta['date']}, `{meta['command']}`: {meta['gpu']} ({meta['memory_gib']:.0f} GiB, compute capability "
             f"{meta['capability']}), driver {meta['driver']}, torch {meta['torch']} (CUDA {meta['cuda']}), Python "
             f"{meta['python']}; {meta['minutes']:.1f} minutes in all.")
    decode_table = table(["engine", "batch", "tokens/s"],
                         [[d["engine"], d["batch"], f"{d['tokens_per_s']:,.0f}"] for d in decode])
    return "\n".join([f"# GPU report: {meta['gpu']}", "", about, "", "## GPU tests (pytest -m gpu)", "",
                      *tests_section(tests), "", "## The memory planner against reality", "",
                      *memory_section(meta, presets), "", "## Training speed per preset", "", *speed_section(presets),
                      "", f"## Decode speed ({meta['decode_model']}, random weights, {meta['new_tokens']} new tokens, "
                      "greedy)", "", decode_table, ""])


def machine(command: str) -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:  # NVML missing or unusable: the tests say which
        driver = f"unknown ({type(e).__name__})"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "gpu": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / GiB,
            "capability": f"{props.major}.{props.minor}", "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    if not torch.cuda.is_available():
        raise UserError("a CUDA GPU is needed: PyTorch sees none here (a CPU-only build, or no driver); run this on "
                        "the GPU machine with the CUDA build of PyTorch", "Checking a GPU")
    gpu_presets = [p for p, s in train.HARDWARE.items() if s["memory_gib"]]
    unknown = [p for p in cfg["presets"] if p not in gpu_presets]
    if unknown:
        raise UserError(f"--presets: {', '.join(unknown)} is not one of {', '.join(gpu_presets)}", "Checking a GPU")
    out = Path(cfg["out"])
    if out.suffix != ".md" or (out.parent.exists() and not out.parent.is_dir()):
        raise UserError(f"--out={out}: give a .md file in a folder", "Checking a GPU")
    start = time.time()
    tests = None
    passed = True
    if cfg["tests"]:
        with tempfile.TemporaryDirectory() as tmp:
            passed, tests = run_tests(Path(tmp) / "gpu-tests.xml")
    names = cfg["presets"] or gpu_presets
    # the presets' data (the built-in corpus, their 32k BPE), prepared once here as their runs will find it
    data_dir = prepare_data.prepare(train.DATASET, cfg["data_root"], train.HARDWARE[names[0]]["vocab_size"])
    presets = []
    for preset in names:
        print(f"rehearsing {preset} ...", flush=True)
        why_not = rehearsable(preset)
        presets.append({**preset_row(preset), "not_rehearsed": why_not} if why_not else
                       rehearse_in_fresh_process(preset, cfg["data_root"], cfg["steps"], cfg["compile"]))
        print(f"  {verdict(presets[-1])}", flush=True)
    print("decoding ...", flush=True)
    decode = decode_rows(prepare_data.load_meta(data_dir)["tokenizer_dir"], cfg["decode_model"], cfg["new_tokens"])
    meta = {**machine(" ".join(["python speed_optimizations_2025.py gpu", *argv])), "steps": cfg["steps"],
            "minutes": (time.time() - start) / 60, "compile": cfg["compile"], "decode_model": cfg["decode_model"],
            "new_tokens": cfg["new_tokens"]}
    text = report(meta, tests, presets, decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"\n{text}\nwrote {out}")
    fit = all(verdict(p) == "fits" or "not_rehearsed" in p for p in presets)
    return 0 if passed and fit else 1


if __name__ == "__main__":
    run_main(main)
