"""What a user can get wrong, typed as they would type it. Every script runs as a subprocess on a bad input
(arguments that are not UTF-8, a file where a folder belongs and the reverse, places nobody can write, corrupt
checkpoints, empty and binary data, NaN and huge numbers, unknown flags and choices) and must answer with one
line naming the fix, exit code 2, no traceback, and every file that was there before unchanged with nothing new
left behind. Ctrl-C in each long phase exits 130 with one line and leaves only complete files.

Each case runs in its own copy of the fixtures, two at a time, so a case that wrote into a fixture is caught and
named. A fresh interpreter would spend most of a case importing torch (about 3 s, ~90 times), so the cases run in
children forked from a process that imported everything once (tests/forkserver.py), set up as the interpreter sets
up `python script.py ARGS`; a few cases, one per script, also run in fresh interpreters and must answer the same,
which keeps the shortcut honest. The Ctrl-C cases run as real subprocesses: signals and their timing are the point
there."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_TEXT, make_checkpoint
from forkserver import ForkServers

UNWRITABLE = "/proc/bad-inputs-test"  # writable by nobody, root included (chmod would not stop root)


@dataclass
class Case:
    script: str
    args: list  # str, or bytes for an argument that is not UTF-8; "{fx}" is the fixtures folder
    message: str  # the part of the error line that names the problem or its fix
    id: str = ""


TG = ["--checkpoint={fx}/ckpt", "--device=cpu", "--prompt=Hello"]  # text_generator.py, a good command to spoil
TR = ["--model=tiny", "--seq_len=32", "--max_steps=2", "--compile=false", "--device=cpu", "--dataset={fx}/good.txt",
      "--vocab_size=300"]  # gpu_training_optimized.py
EX = ["--checkpoint={fx}/ckpt"]  # export_model.py
EV = ["--checkpoint={fx}/ckpt", "--device=cpu", "--dataset={fx}/good.txt"]  # evaluate_model.py
SV = ["--checkpoint={fx}/ckpt", "--device=cpu", "--port=0"]  # serve.py
SP = ["--quick", "--device=cpu"]  # speed_optimizations_2025.py
PD = ["--dataset={fx}/good.txt", "--vocab_size=300"]  # prepare_data.py

CASES = [
    # text_generator.py: arguments
    Case("text_generator.py", TG + [b"--prompt=caf\xe9"], "--prompt is not UTF-8", "prompt-not-utf8"),
    Case("text_generator.py", TG + [b"--stop=\xff\xfe"], "--stop is not UTF-8", "stop-not-utf8"),
    Case("text_generator.py", TG + ["--prompt="], "--prompt is empty", "prompt-empty"),
    Case("text_generator.py", TG + ["--prompt=" + "word " * 400], "shorten it", "prompt-too-long"),
    Case("text_generator.py", TG + ["--temperature=nan"], "finite number", "temperature-nan"),
    Case("text_generator.py", TG + ["--top_p=0"], "top_p must be in (0, 1]", "top_p-zero"),
    Case("text_generator.py", TG + ["--top_k=-3"], "top_k must be", "top_k-negative"),
    Case("text_generator.py", TG + ["--seed=" + "9" * 30], "seed must be", "seed-huge"),
    Case("text_generator.py", TG + ["--quantize=int4"], "the choice is int8", "quantize-unknown"),
    Case("text_generator.py", TG + ["--device=cuda"], "sees no CUDA GPU", "device-no-cuda"),
    Case("text_generator.py", TG + ["--chat=maybe"], "expects true or false", "bool-text"),
    Case("text_generator.py", TG + ["--temprature=0.5"], "unknown flag --temprature", "flag-misspelt"),
    Case("text_generator.py", TG + ["Hello"], "flags look like --name=value", "positional"),
    Case("text_generator.py", TG + ["--prompts_file={fx}/latin1.txt"], "cannot read --prompts_file", "prompts-latin1"),
    Case("text_generator.py", TG + ["--prompts_file={fx}/empty.txt"], "no prompt in it", "prompts-file-empty"),
    Case("text_generator.py", TG + ["--prompts_file={fx}"], "cannot read --prompts_file", "prompts-file-folder"),
    # text_generator.py: checkpoints
    Case("text_generator.py", TG + ["--checkpoint=/nonexistent/run"], "does not exist", "ckpt-missing"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/good.txt"], "not a checkpoint directory", "ckpt-is-file"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/bad_tokenizer"], "tokenizer", "ckpt-corrupt-tokenizer"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/bad_config"], "not valid JSON", "ckpt-corrupt-config"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/config_list"], "not a JSON object", "ckpt-config-list"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/negative_dims"], "must be positive", "ckpt-negative-size"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/bad_weights"], "not a readable safetensors", "ckpt-garbage"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/short_weights"], "not a readable safetensors", "ckpt-cut"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/no_weights"], "no weights", "ckpt-no-weights"),
    Case("text_generator.py", TG + ["--checkpoint={fx}/wrong_shape"], "has shape", "ckpt-wrong-shape"),
    # prepare_data.py
    Case("prepare_data.py", ["--dataset={fx}/empty.txt"], "no text in it", "data-empty"),
    Case("prepare_data.py", ["--dataset={fx}/binary.txt"], "not UTF-8 text", "data-binary"),
    Case("prepare_data.py", ["--dataset={fx}/data.bin"], "unsupported file type", "data-suffix"),
    Case("prepare_data.py", ["--dataset={fx}/empty_dir"], "folder has no", "data-empty-folder"),
    Case("prepare_data.py", [b"--dataset=/nonexistent/caf\xe9.txt"], "no such file or folder", "data-path-not-utf8"),
    Case("prepare_data.py", ["--dataset={fx}/one_doc.txt"], "single document", "data-one-document"),
    Case("prepare_data.py", ["--dataset={fx}/no_field.jsonl"], "--text_field=NAME", "data-no-field"),
    Case("prepare_data.py", ["--dataset={fx}/broken.jsonl"], "cannot read it", "data-broken-jsonl"),
    Case("prepare_data.py", ["--dataset={fx}/chat_bad_line.jsonl"], "line 2: not valid JSON", "chat-bad-line"),
    Case("prepare_data.py", PD + ["--vocab_size=10"], "is too small", "vocab-tiny"),
    Case("prepare_data.py", PD + ["--val_fraction=nan"], "finite number", "val-fraction-nan"),
    Case("prepare_data.py", PD + ["--max_tokens=-1"], "--max_tokens must be >= 0", "max-tokens-negative"),
    Case("prepare_data.py", PD + ["--out_dir={fx}/good.txt"], "is a file, not a folder", "out-is-file"),
    Case("prepare_data.py", PD + ["--out_dir={fx}/good.txt/data"], "is a file, so it cannot hold", "out-under-file"),
    Case("prepare_data.py", PD + [f"--out_dir={UNWRITABLE}"], "cannot write there", "out-unwritable"),
    Case("prepare_data.py", PD + ["--tokenizer={fx}/bad_tokenizer"], "cannot load tokenizer", "tokenizer-corrupt"),
    # gpu_training_optimized.py
    Case("gpu_training_optimized.py", TR + ["--optimizer=sgd"], "--optimizer='sgd' is not one of", "optimizer"),
    Case("gpu_training_optimized.py", TR + ["--lr=nan"], "finite number", "lr-nan"),
    Case("gpu_training_optimized.py", TR + ["--batch_size=-1"], "--batch_size must be positive", "batch-negative"),
    Case("gpu_training_optimized.py", TR + ["--min_lr=1"], "is above --lr", "min-lr-above-lr"),
    Case("gpu_training_optimized.py", TR + ["--preset=rtx9090"], "--preset='rtx9090' is not one of", "preset"),
    Case("gpu_training_optimized.py", TR + ["--model=huge"], "unknown model size", "model-unknown"),
    Case("gpu_training_optimized.py", TR + ["--device=cuda"], "sees no CUDA GPU", "device-no-cuda"),
    Case("gpu_training_optimized.py", TR + ["--task=rlhf"], "--task='rlhf' is not one of", "task"),
    Case("gpu_training_optimized.py", TR + ["--steps=10"], "unknown flag --steps", "flag-unknown"),
    Case("gpu_training_optimized.py", TR + ["--out_dir={fx}/good.txt"], "is a file, not a folder", "out-is-file"),
    Case("gpu_training_optimized.py", TR + ["--out_dir={fx}/good.txt/run"], "cannot hold", "out-under-file"),
    Case("gpu_training_optimized.py", TR + [f"--out_dir={UNWRITABLE}"], "cannot write there", "out-unwritable"),
    Case("gpu_training_optimized.py", TR + ["--data_root={fx}/good.txt"], "is a file, not a folder", "data-root-file"),
    Case("gpu_training_optimized.py", TR + [f"--data_root={UNWRITABLE}"], "cannot write there", "data-unwritable"),
    Case("gpu_training_optimized.py", TR + ["--dataset={fx}/empty.txt"], "no text in it", "data-empty"),
    Case("gpu_training_optimized.py", TR + ["--tokenizer={fx}/bad_tokenizer"], "cannot load tokenizer", "tok-corrupt"),
    Case("gpu_training_optimized.py", TR[1:] + ["--init_from={fx}/bad_config"], "not valid JSON", "init-corrupt"),
    Case("gpu_training_optimized.py", TR + ["--resume={fx}/bad_weights"], "holds no training state", "resume-bad"),
    # export_model.py
    Case("export_model.py", EX + ["--format=tflite"], "unknown --format='tflite'", "format"),
    Case("export_model.py", ["--checkpoint={fx}/bad_tokenizer", "--format=int8"], "tokenizer.json", "corrupt-tok"),
    Case("export_model.py", ["--checkpoint={fx}/bad_tokenizer_config", "--format=int8"], "tokenizer_config.json",
         "corrupt-tok-config"),
    Case("export_model.py", ["--checkpoint={fx}/bad_generation_config", "--format=onnx"], "generation_config.json",
         "corrupt-generation-config"),
    Case("export_model.py", ["--checkpoint={fx}/bad_config"], "not valid JSON", "corrupt-config"),
    Case("export_model.py", ["--checkpoint={fx}/bad_weights"], "not a readable safetensors", "corrupt-weights"),
    Case("export_model.py", ["--checkpoint=/nonexistent/run"], "does not exist", "ckpt-missing"),
    Case("export_model.py", EX + ["--out={fx}/good.txt", "--force"], "is a file, not a folder", "out-is-file"),
    Case("export_model.py", EX + ["--format=gguf", "--out={fx}/empty_dir", "--force"], "is a folder, not a file",
         "gguf-out-is-folder"),
    Case("export_model.py", EX + ["--out={fx}/good.txt/x", "--format=int8"], "cannot hold", "out-under-file"),
    Case("export_model.py", EX + [f"--out={UNWRITABLE}/int8", "--format=int8"], "cannot write there", "unwritable"),
    Case("export_model.py", EX + ["--out={fx}/good.txt"], "already exists; pass --force", "out-exists"),
    Case("export_model.py", EX + ["--out={fx}/ckpt", "--force"], "would replace the checkpoint", "out-is-ckpt"),
    Case("export_model.py", EX + ["--format=gguf", "--gguf_type=q4", "--out={fx}/m.gguf"], "unknown --gguf_type",
         "gguf-type"),
    # evaluate_model.py
    Case("evaluate_model.py", EV + ["--dataset="], "--dataset=FILE_OR_NAME", "no-dataset"),
    Case("evaluate_model.py", EV + ["--dataset={fx}/empty.txt"], "no text in it", "data-empty"),
    Case("evaluate_model.py", EV + ["--dataset={fx}/binary.txt"], "not UTF-8 text", "data-binary"),
    Case("evaluate_model.py", EV + ["--seq_len=100000"], "exceeds the model's context", "seq-huge"),
    Case("evaluate_model.py", EV + ["--batch_size=0"], "--batch_size must be >= 1", "batch-zero"),
    Case("evaluate_model.py", EV + ["--checkpoint={fx}/bad_tokenizer"], "tokenizer", "corrupt-tokenizer"),
    Case("evaluate_model.py", EV + ["--checkpoint={fx}/short_weights"], "not a readable safetensors", "cut-weights"),
    # serve.py (start-up flags: everything is checked before the server answers anything)
    Case("serve.py", SV + ["--port=70000"], "--port must be in 0..65535", "port-huge"),
    Case("serve.py", SV + ["--max_batch_size=0"], "--max_batch_size must be at least 1", "batch-zero"),
    Case("serve.py", SV + ["--max_queue=0"], "--max_queue must be at least 1", "queue-zero"),
    Case("serve.py", SV + ["--quantize=int4"], "the choice is int8", "quantize"),
    Case("serve.py", SV + ["--checkpoint={fx}/bad_tokenizer"], "tokenizer", "corrupt-tokenizer"),
    Case("serve.py", SV + [b"--api_key=\xff\xfe"], "--api_key is not UTF-8", "api-key-not-utf8"),
    # speed_optimizations_2025.py
    Case("speed_optimizations_2025.py", SP + ["--rows=warp_drive"], "unknown --rows warp_drive", "rows"),
    Case("speed_optimizations_2025.py", SP + ["--out={fx}/good.txt"], "is a file, not a folder", "out-is-file"),
    Case("speed_optimizations_2025.py", SP + [f"--out={UNWRITABLE}"], "cannot write there", "out-unwritable"),
    Case("speed_optimizations_2025.py", SP + ["--steps=0"], "--steps must be at least 1", "steps-zero"),
    Case("speed_optimizations_2025.py", SP + ["--device=mps"], "choose auto, cpu or cuda", "device"),
]
for case in CASES:
    case.id = f"{Path(case.script).stem}-{case.id}"
# Run in fresh interpreters too, to show the fork server answers as they do: one case per script, among them the
# arguments that are not UTF-8 and the errors found deep in the libraries (a tokenizer, safetensors)
FRESH = ["text_generator-prompt-not-utf8", "prepare_data-data-path-not-utf8", "gpu_training_optimized-tok-corrupt",
         "export_model-corrupt-weights", "evaluate_model-cut-weights", "serve-api-key-not-utf8",
         "speed_optimizations_2025-out-unwritable"]
TIMEOUT = 300  # seconds a case may take to refuse its input


# -----------------------------------------------------------------------------
# Fixtures: one folder of good and broken inputs, copied for every case


def corrupt(src: Path, dst: Path, name: str, content: bytes | None) -> None:
    """A copy of checkpoint `src` at `dst` whose file `name` holds `content` (None: the file is removed)."""
    shutil.copytree(src, dst)
    if content is None:
        (dst / name).unlink()
    else:
        (dst / name).write_bytes(content)


def build_fixtures(fx: Path, tokenizer) -> None:
    fx.mkdir()
    ckpt = make_checkpoint(fx / "ckpt", tokenizer)
    weights = (ckpt / "model.safetensors").read_bytes()
    config = (ckpt / "config.json").read_text()
    corrupt(ckpt, fx / "bad_tokenizer", "tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": 7')
    corrupt(ckpt, fx / "bad_tokenizer_config", "tokenizer_config.json", b"\x00\x01 not json")
    corrupt(ckpt, fx / "bad_generation_config", "generation_config.json", b"{")
    corrupt(ckpt, fx / "bad_config", "config.json", b'{"model_type": "llama",')
    corrupt(ckpt, fx / "config_list", "config.json", b"[1, 2, 3]")
    negative = config.replace('"hidden_size": 64', '"hidden_size": -64')
    corrupt(ckpt, fx / "negative_dims", "config.json", negative.encode())
    corrupt(ckpt, fx / "wrong_shape", "config.json", config.replace('"intermediate_size": 176',
                                                                      '"intermediate_size": 192').encode())
    corrupt(ckpt, fx / "bad_weights", "model.safetensors", os.urandom(4096))
    corrupt(ckpt, fx / "short_weights", "model.safetensors", weights[:len(weights) // 2])
    corrupt(ckpt, fx / "no_weights", "model.safetensors", None)
    (fx / "empty_dir").mkdir()
    (fx / "good.txt").write_text("\n\n".join(SAMPLE_TEXT), encoding="utf-8")
    (fx / "empty.txt").write_bytes(b"")
    (fx / "blank.txt").write_text("\n\n   \n\t\n")
    (fx / "binary.txt").write_bytes(bytes(range(128, 256)) * 64)
    (fx / "latin1.txt").write_bytes("café au lait\nthé\n".encode("latin-1"))
    (fx / "data.bin").write_bytes(os.urandom(256))
    (fx / "one_doc.txt").write_text("a single paragraph of text with no blank line in it")
    (fx / "no_field.jsonl").write_text('{"content": "hello"}\n{"content": "world"}\n')
    (fx / "broken.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    chat = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
    (fx / "chat_bad_line.jsonl").write_text(chat + '{"messages": [\n')
    (fx / "chat_no_reply.jsonl").write_text(chat.replace('"assistant"', '"user"'))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_tokenizer) -> Path:
    fx = tmp_path_factory.mktemp("inputs") / "fx"
    build_fixtures(fx, tiny_tokenizer)
    return fx


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and folder under root, by path: a file's SHA-256, or "dir"."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        found[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def command(case: Case, fx: Path) -> list:
    def fill(a):
        return a.replace(b"{fx}", os.fsencode(fx)) if isinstance(a, bytes) else a.replace("{fx}", str(fx))

    return [sys.executable, str(ROOT / case.script)] + [fill(a) for a in case.args]


def environment(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp / "hf-datasets-cache")}


def run_fresh(argv: list, cwd: Path, env: dict, timeout: float) -> tuple[int | None, bytes, bytes]:
    """What ForkServers.run gives, from a new interpreter."""
    try:
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, b"", b""
    return r.returncode, r.stdout, r.stderr


def run_case(case: Case, fixtures: Path, tmp: Path, run=run_fresh) -> dict:
    """The case in a fresh copy of the fixtures, run from an empty working folder beside them."""
    work = tmp / case.id
    shutil.copytree(fixtures, work / "fx")
    before = tree_hashes(work)
    code, stdout, stderr = run(command(case, work / "fx"), work, environment(tmp), TIMEOUT)
    if code is None:
        stderr = b"timed out: the bad input was not refused"
    out = {"code": code, "stdout": stdout.decode(errors="replace"), "stderr": stderr.decode(errors="replace")}
    out["before"], out["after"] = before, tree_hashes(work)
    shutil.rmtree(work)
    return out


def selected(request, test=None) -> list[Case]:
    """The cases this session runs (of one test, or of every test here), -k and all."""
    ids = {item.callspec.params["case"].id for item in request.session.items
           if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
           and (test is None or item.originalname == test.__name__)}
    return [c for c in CASES if c.id in ids]


@pytest.fixture(scope="module")
def cases_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cases")


@pytest.fixture(scope="module")
def results(fixtures, cases_tmp, request) -> dict[str, dict]:
    """Every selected case's outcome, run two at a time in children of two fork servers."""
    todo = selected(request)
    with ForkServers(2, environment(cases_tmp), cases_tmp / "output") as servers, ThreadPoolExecutor(2) as pool:
        return dict(zip((c.id for c in todo), pool.map(lambda c: run_case(c, fixtures, cases_tmp, servers.run), todo)))


@pytest.fixture(scope="module")
def fresh_results(results, fixtures, cases_tmp, request) -> dict[str, dict]:
    """The FRESH cases' outcomes from new interpreters, once the forked ones are done: in the same folders, which
    the error lines name."""
    todo = selected(request, test_fork_server_answers_as_a_fresh_interpreter)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip((c.id for c in todo), pool.map(lambda c: run_case(c, fixtures, cases_tmp), todo)))


def one_error_line(stderr: str) -> str:
    """The error line; progress bars may come before it, nothing after it."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    return errors[0]


def test_enough_cases_for_every_script():
    per_script = {s: sum(c.script == s for c in CASES) for s in {c.script for c in CASES}}
    assert len(CASES) >= 60 and len(per_script) == 7 and min(per_script.values()) >= 5, per_script
    assert len({c.id for c in CASES}) == len(CASES)
    fresh = [c for c in CASES if c.id in FRESH]
    assert len(fresh) == len(FRESH) and {c.script for c in fresh} == set(per_script), FRESH


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, results):
    r = results[case.id]
    assert "Traceback" not in r["stdout"] + r["stderr"], r["stderr"][-3000:]
    assert r["code"] == 2, (r["code"], r["stderr"][-2000:])
    line = one_error_line(r["stderr"])
    assert case.message in line and "(see README: " in line, line
    assert r["after"] == r["before"], sorted(set(r["after"].items()) ^ set(r["before"].items()))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in FRESH], ids=lambda c: c.id)
def test_fork_server_answers_as_a_fresh_interpreter(case, results, fresh_results):
    forked, fresh = results[case.id], fresh_results[case.id]
    assert fresh["code"] == 2 and "error: " in fresh["stderr"], fresh  # a case that really failed in its own way
    assert [forked[k] for k in ("code", "stdout", "stderr")] == [fresh[k] for k in ("code", "stdout", "stderr")]


# -----------------------------------------------------------------------------
# Ctrl-C in each long phase: exit 130, one line, no traceback, nothing half-written that looks complete


@dataclass
class Interrupt:
    id: str
    script: str
    args: list
    wait_for: str  # text in the output that says the phase has begun


INTERRUPTS = [
    Interrupt("prepare-tokenizer", "prepare_data.py", ["--dataset=builtin", "--vocab_size=2000"],
              "training a byte-level BPE"),
    Interrupt("training-data", "gpu_training_optimized.py", ["--model=tiny", "--seq_len=32", "--max_steps=5",
              "--compile=false", "--device=cpu", "--dataset=builtin", "--vocab_size=2000"],
              "training a byte-level BPE"),
    Interrupt("training-loop", "gpu_training_optimized.py", ["--model=tiny", "--seq_len=32", "--max_steps=100000",
              "--compile=false", "--device=cpu", "--dataset={fx}/good.txt", "--vocab_size=300",
              "--eval_interval=100000", "--checkpoint_interval=100000", "--log_interval=1"], "step"),
    # greedy: this random model then decodes all 4000 tokens (sampled, it may draw an end token within a second)
    Interrupt("generate", "text_generator.py", ["--checkpoint={fx}/long", "--device=cpu", "--prompt=Hello",
              "--max_new_tokens=4000", "--temperature=0"], ""),
    Interrupt("export-onnx", "export_model.py", ["--checkpoint={fx}/ckpt", "--format=onnx", "--out=onnx"],
              "exporting"),
    Interrupt("evaluate", "evaluate_model.py", ["--checkpoint={fx}/long", "--device=cpu", "--dataset={fx}/big.txt",
              "--batch_size=1"], "evaluating"),
    Interrupt("serve", "serve.py", ["--checkpoint={fx}/ckpt", "--device=cpu", "--port=0"], "serving"),
    # after the first row: torch imports sympy lazily there, and an interrupt inside that import is torch's to report
    Interrupt("speed-rows", "speed_optimizations_2025.py", ["--quick", "--device=cpu", "--out=speed"], "| 1/"),
]


@pytest.fixture(scope="module")
def long_fixtures(fixtures, tiny_tokenizer) -> Path:
    """A model with a long context (for answers and evaluations long enough to interrupt) and a bigger text."""
    make_checkpoint(fixtures / "long", tiny_tokenizer, max_seq_len=4096)
    (fixtures / "big.txt").write_text("\n\n".join(SAMPLE_TEXT * 20), encoding="utf-8")
    return fixtures


def run_until(cmd: list, cwd: Path, env: dict, marker: str) -> tuple[int, str, str]:
    """Start the command and send SIGINT once `marker` shows in its output (both streams).
    Returns (exit code, all the output, the output after the marker)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.time() + 300
    while marker.encode() not in seen or not seen:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk or time.time() > deadline:
            p.kill()
            raise AssertionError(f"{marker!r} never showed:\n{seen.decode(errors='replace')[-2000:]}")
        seen += chunk
    time.sleep(0.3)  # well inside the phase
    assert p.poll() is None, f"it ended before Ctrl-C (exit {p.returncode}): the phase was too short to interrupt"
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    return p.returncode, (seen + rest).decode(errors="replace"), rest.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("case", INTERRUPTS, ids=lambda c: c.id)
def test_ctrl_c_exits_130_with_one_line_and_no_half_written_files(case, long_fixtures, tmp_path):
    from checkpoint import is_complete_checkpoint

    work = tmp_path / "work"
    shutil.copytree(long_fixtures, work / "fx")
    before = tree_hashes(work)
    cmd = [sys.executable, str(ROOT / case.script)] + [a.replace("{fx}", str(work / "fx")) for a in case.args]
    code, output, after_signal = run_until(cmd, work, environment(tmp_path), case.wait_for)
    assert "Traceback" not in output, output[-3000:]
    assert code == 130, (code, output[-2000:])
    lines = [line for line in after_signal.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    said = [line for line in lines if "interrupted" in line or "stopped by SIGINT" in line]
    assert len(said) == 1 and lines[-1] == said[0], after_signal[-2000:]  # the last thing it says, once
    after = tree_hashes(work)
    assert all(after.get(k) == v for k, v in before.items()), "a file that was there before changed"
    new = set(after) - set(before)
    assert not any(".tmp-" in n or ".export-" in n for n in new), sorted(new)
    for name in new:  # a folder that looks like a checkpoint or prepared data is whole
        path = work / name
        if (path / "config.json").exists():
            assert is_complete_checkpoint(path), name
        if path.name.endswith((".bin",)) and path.parent.name != "fx":
            assert (path.parent / "meta.json").is_file(), name


# -----------------------------------------------------------------------------
# A data root shared by several users


def test_prepared_data_folder_is_as_readable_as_the_umask_allows(tmp_path, tiny_tokenizer):
    """mkdtemp makes owner-only folders; a data folder renamed into place from one must still be readable by the
    others who share the data root (umask 022: rwxr-xr-x)."""
    import prepare_data

    (tmp_path / "corpus.txt").write_text("\n\n".join(SAMPLE_TEXT), encoding="utf-8")
    old = os.umask(0o022)
    try:
        data_dir = prepare_data.prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer=tiny_tokenizer)
    finally:
        os.umask(old)
    assert data_dir.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in data_dir.iterdir())
