"""The README and the code cannot drift apart: every error names a README section that exists."""

import ast
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT, SAMPLE_TEXT, make_checkpoint

SCRIPTS = sorted(p for p in ROOT.glob("*.py"))


def readme_headings() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


def error_sections() -> list[tuple[str, int, str | None]]:
    """(file, line, section) for every UserError raised in the scripts, the subclasses' fixed sections included.
    A section that is not a string literal comes back as None."""
    found = []
    for path in SCRIPTS:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        subclasses = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                      and any(isinstance(b, ast.Name) and b.id == "UserError" for b in n.bases)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else None
            is_super_init = (isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                             and isinstance(node.func.value, ast.Call)
                             and getattr(node.func.value.func, "id", None) == "super")
            if name == "UserError" or (is_super_init and any(node in ast.walk(c) for c in subclasses.values())):
                arg = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "section"), None)
                section = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                found.append((path.name, node.lineno, section))
    return found


def test_every_error_names_an_existing_readme_section():
    sections = error_sections()
    assert len(sections) > 20  # the scripts really raise user errors; the scan found them
    headings = readme_headings()
    unnamed = [f"{f}:{line}" for f, line, s in sections if s is None]
    assert not unnamed, f"UserError without a literal README section: {unnamed}"
    missing = sorted({f"{f}:{line} -> {s!r}" for f, line, s in sections if s not in headings})
    assert not missing, f"README has no heading for: {missing}"


# -----------------------------------------------------------------------------
# Every command in the README runs as written: the ```bash blocks (and the `python ...` lines of ```powershell
# blocks) are run here on a CPU, in order, in one temporary folder holding the files they name (small text files,
# chats, a tiny local "pretrained" model). A test may only shorten a command (CAPS and caps()): a step cap, a
# time cap, fewer tokens; never a size, a model or a preset. Training commands stop after their first step with
# --stop_after, which keeps the run's schedule and settings, so what runs is the user's run, ended early. The few
# that cannot run in CI are listed in NOT_RUN with the reason; their flags are still given to the script's own
# parser (with --help last, which parses every flag before it and exits), so a renamed flag breaks this test.

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A command (its text) containing one of these is not run; why (and torchrun lines without --device=cpu: GPUs):
NOT_RUN = {
    "roneneldan/TinyStories": "downloads a Hugging Face hub dataset",
    "HuggingFaceFW/fineweb-edu": "downloads a Hugging Face hub dataset",
    "--init_from=HuggingFaceTB/": "downloads a Hugging Face hub model",
    "hf download": "downloads a Hugging Face hub model",
    "lm-eval": "tests/test_evaluate.py runs the lm_eval command on a tiny checkpoint (minutes on the default one)",
    "lm_eval ": "tests/test_evaluate.py runs the lm_eval command on a tiny checkpoint (minutes on the default one)",
    "--host=0.0.0.0": "a second server (the first one in the block is started and queried)",
    "prepare_data.py --benchmark": "tokenizes the built-in corpus 9 times (about a minute)",
    "speed_optimizations_2025.py gpu": "needs a CUDA GPU (tests/test_gpu.py checks its one-line refusal here)",
    "--preset=rtx4070ti": "the rtx4070ti preset trains the 730m model: minutes a step on a CPU",
}
# Environment setup: pip's requirements are checked to be installed; venv/conda lines are what CI itself did.
SETUP = ("python -m venv", "python3 -m venv", "source ")
# The caps each script's commands get (a value the README gives is lowered to it; a cap is added where it has none),
# and the two flags that are not caps: serve.py's port (the README's 8000 may be taken here) and export_model.py's
# --force (the README's export lines are alternatives writing the same folder).
CAPS = {
    "text_generator.py": {"max_new_tokens": "4"},
    "evaluate_model.py": {"max_tokens": "2000"},
    "speed_optimizations_2025.py": {"warmup_steps": "0", "steps": "1"},
    "muon_optimizer.py": {"steps": "2"},
}
NOT_CAPS = {
    "serve.py": {"port": "0"},
    "export_model.py": {"force": "true"},
    # its defaults are in /tmp, shared; data/ holds the built-in corpus with the 8,192-token BPE it would make
    "muon_optimizer.py": {"data_dir": "data", "out_dir": "muon"},
    "speed_optimizations_2025.py": {"out": "speed"},
}
INTERACTIVE_INPUT = "Once upon a time\n/temp 0.5\n/quit\n"  # text_generator.py's prompt, typed


def readme_blocks() -> list[tuple[str, str, str]]:
    """(section, language, text) of each fenced block of the README, in order (indented ones too)."""
    blocks, section, lang, indent, block = [], "", None, "", []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        fence = re.match(r"(\s*)```(\w*)", line)
        if lang is None and fence:
            indent, lang, block = fence.group(1), fence.group(2), []
        elif lang is not None and fence:
            blocks.append((section, lang, "\n".join(block)))
            lang = None
        elif lang is not None:
            block.append(line.removeprefix(indent))
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    return blocks


def readme_commands() -> list[tuple[str, str]]:
    """(section, command) for each command of the README's bash and PowerShell blocks, in order: continuation
    lines joined, comments dropped, `a && b` split in two."""
    return [(section, c) for section, lang, text in readme_blocks() if lang in ("bash", "powershell")
            for c in block_commands(text, lang)]


def block_commands(text: str, lang: str) -> list[str]:
    continuation = "`" if lang == "powershell" else "\\"
    text = re.sub(re.escape(continuation) + r"[ \t]*\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        if lang == "powershell" and not line.strip().startswith("python"):
            continue  # the PowerShell lines that matter here run the scripts; the rest is setup
        words = shlex.split(line, comments=True)
        while words:
            part = words[:words.index("&&")] if "&&" in words else words
            found.append(shlex.join(part))
            words = words[len(part) + 1:]
    return found


COMMANDS = readme_commands()
DEFAULT_RUN = "python gpu_training_optimized.py"  # the workdir's out/ is this run's


def not_run_reason(command: str) -> str | None:
    if split(command)[1][0] == "torchrun" and "--device=cpu" not in command:  # NCCL_...=x torchrun too
        return "torchrun on CUDA GPUs"
    return next((why for pattern, why in NOT_RUN.items() if pattern in command), None)


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments, then the words."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def capped(flags: list[str], caps: dict[str, str], others: dict[str, str] | None = None) -> list[str]:
    """The flags with each cap lowered to (or added as) its value, and the NOT_CAPS flags set."""
    def name(f: str) -> str:
        return f[2:].partition("=")[0].replace("-", "_")

    given = {name(f): f.partition("=")[2] for f in flags}
    lowered = {k: v if k not in given or float(v) < float(given[k]) else given[k] for k, v in caps.items()}
    set_here = {**lowered, **(others or {})}
    return [f for f in flags if name(f) not in set_here] + [f"--{k}={v}" for k, v in set_here.items()]


def flag(flags: list[str], name: str) -> str | None:
    return next((f.partition("=")[2] for f in flags if f.partition("=")[0] == f"--{name}"), None)


def newest_step(run: Path) -> int:
    from checkpoint import list_checkpoints

    return int(list_checkpoints(run)[-1].name.rpartition("-")[2])


class Workdir:
    """The folder the commands run in, and what they left for the next ones (a server, the commands run)."""

    def __init__(self, path: Path):
        self.path, self.runs, self.server, self.url, self.done = path, 0, None, None, set()

    def fresh_dir(self, out: str) -> Path:
        """A folder of its own for a new training run, since README lines are alternatives and a run never
        overwrites another: the files the commands name and the data/ cache, linked; not the run's own `out`."""
        self.runs += 1
        path = self.path / "runs" / str(self.runs)
        path.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry.name not in ("runs", out):
                (path / entry.name).symlink_to(entry)
        return path

    def training_flags(self, flags: list[str]) -> list[str]:
        """The one cap training gets: the session stops after its first step (a resumed run after one more), with
        a checkpoint, keeping the schedule and settings the command gives."""
        stop = newest_step(self.path / (flag(flags, "out_dir") or "out")) + 1 if flag(flags, "resume") else 1
        return capped(flags, {"stop_after": str(stop)})

    def rewrite(self, script: str, flags: list[str]) -> list[str]:
        if "--help" in flags:
            return flags
        if script == "gpu_training_optimized.py":
            return self.training_flags(flags)
        flags = [re.sub(r"(checkpoint-)\d+", lambda m: f"{m.group(1)}{newest_step(self.path / 'out')}", f)
                 for f in flags]  # a checkpoint the README names by a step a one-step run does not reach
        others = dict(NOT_CAPS.get(script, {}))
        if script == "speed_optimizations_2025.py" and not flag(flags, "rows"):
            others["rows"] = "bf16"  # fewer rows, each as given: compiled rows take ~30 s; test_speed.py runs all
        return capped(flags, CAPS.get(script, {}), others)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """The files the README's commands name, each small; `out` is the README's default run, stopped after its
    first step (so the built-in corpus is tokenized once, in data/, as on a user's machine)."""

    path = tmp_path_factory.mktemp("readme")
    corpus = "\n\n".join(SAMPLE_TEXT)
    for name in ("my_corpus.txt", "shakespeare.txt", "book.txt", "valid.txt"):
        (path / name).write_text(corpus, encoding="utf-8")
    (path / "tinystories.jsonl").write_text(  # what the README's hub download line before it saves
        "".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT), encoding="utf-8")
    (path / "my_corpus").mkdir()
    (path / "my_corpus" / "part1.jsonl").write_text(
        "".join(json.dumps({"content": t}) + "\n" for t in SAMPLE_TEXT), encoding="utf-8")
    (path / "prompts.txt").write_text("Once upon a time\nThe king\n", encoding="utf-8")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."}]} for i in range(40)]
    (path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    tiny_tokenizer.save_pretrained(path / "path/to/tokenizer_dir")
    make_checkpoint(path / "SmolLM2-135M-Instruct", tiny_tokenizer, max_seq_len=64)  # a local Llama folder
    mp = pytest.MonkeyPatch()
    mp.chdir(path)
    work = Workdir(path)
    run_command(work, DEFAULT_RUN)
    yield work
    mp.undo()
    if work.server:
        work.server.terminate()
        work.server.wait(10)


def run_python(script: str, flags: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    """main(flags) in this process (seconds instead of a new interpreter per command)."""
    module = importlib.import_module(script.removesuffix(".py"))
    mp = pytest.MonkeyPatch()
    if cwd:
        mp.chdir(cwd)
    for name, value in (env or {}).items():
        mp.setenv(name, value)
    if script == "text_generator.py" and not (flag(flags, "prompt") or flag(flags, "prompts_file")):
        mp.setattr(sys, "stdin", io.StringIO(INTERACTIVE_INPUT))
    try:
        assert module.main(flags) in (0, None)
    except SystemExit as e:  # --help
        assert e.code == 0
    finally:
        mp.undo()


def check_flags(script: str, flags: list[str]) -> None:
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exit:
        module.main(flags + ["--help"])
    assert exit.value.code == 0


def subprocess_env(extra: dict) -> dict:
    return {**os.environ, **extra, "PYTHONPATH": str(ROOT)}


def start_server(work: Workdir, flags: list[str]) -> None:
    """serve.py blocks until stopped: it runs in the background until the module's tests end, so the curl lines
    that follow it query it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *flags],
                            cwd=work.path, env=subprocess_env({}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    work.server = proc
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving .* at (http://\S+)/v1", line)
        if found:
            work.url = found.group(1)
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # its request log must not fill the pipe
            return
    raise AssertionError("serve.py did not start:\n" + "".join(lines))


def run_curl(work: Workdir, words: list[str]) -> None:
    assert work.url, "a curl line needs a `python serve.py` line before it in the README"
    words = [re.sub(r"http://127\.0\.0\.1:8000", work.url, w) for w in words]
    result = subprocess.run([*words, "--silent", "--show-error", "--fail-with-body", "--max-time", "120"],
                            cwd=work.path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"choices"' in result.stdout or "data: [DONE]" in result.stdout, result.stdout


def run_torchrun(work: Workdir, words: list[str], env: dict) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words[1:])  # torchrun's own flags exist
    script, flags = Path(args.training_script).name, args.training_script_args
    flags = work.rewrite(script, flags)
    launcher = words[1:words.index(args.training_script)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / script), *flags],
                            cwd=work.fresh_dir(flag(flags, "out_dir") or "out"), env=subprocess_env(env),
                            capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def check_pip(words: list[str]) -> None:
    """`pip install ...`: CI installed these; check every requirement named (or in a -r file) is satisfied."""
    args, requirements = words[2:], []
    while args:
        arg = args.pop(0)
        if arg in ("-r", "--requirement"):
            requirements += requirement_lines(ROOT / args.pop(0))
        elif arg in ("--index-url", "--extra-index-url"):
            args.pop(0)  # where from, not what
        elif not arg.startswith("-"):
            requirements.append(arg)
    for line in requirements:
        req = Requirement(line)
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{line}: {version} installed"


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line.startswith("-r"):
            lines += requirement_lines(path.parent / line[2:].strip())
        elif line:
            lines.append(line)
    return lines


def ci_test_command() -> str:
    return (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]


def run_command(work: Workdir, command: str) -> None:
    env, words = split(command)
    program = words[0]
    work.done.add(command)
    if program in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        # the test command itself: it must be what CI runs (running it here would recurse)
        assert words[1:] == ci_test_command().split()[1:], ci_test_command()
    elif program in ("python", "python3") and words[1] == "-c":
        subprocess.run([sys.executable, *words[1:]], cwd=work.path, env=subprocess_env(env), check=True)
    elif program in ("python", "python3") and words[1].endswith(".py"):
        script, flags = words[1], work.rewrite(words[1], words[2:])
        new_run = script == "gpu_training_optimized.py" and not flag(flags, "resume") and "--help" not in flags
        if script == "serve.py":
            start_server(work, flags)
        else:
            out = flag(flags, "out_dir") or "out"
            run_python(script, flags, env, work.fresh_dir(out) if new_run and (work.path / out).exists() else None)
    elif program == "pip":
        check_pip(words)
    elif program == "torchrun":
        run_torchrun(work, words, env)
    elif program == "curl":
        run_curl(work, words)
    else:
        raise AssertionError(f"no rule runs this README command: add one to tests/test_readme.py: {command}")


@pytest.mark.parametrize("section,command", COMMANDS, ids=[f"{s[:20]}:{c[:60]}" for s, c in COMMANDS])
def test_readme_command_runs(workdir, section, command):
    if command.startswith(SETUP):
        pytest.skip("environment setup: CI made its own")
    why = not_run_reason(command)
    if why:
        check_not_run(command)
        pytest.skip(f"not run in CI ({why}); its flags were checked")
    if command in workdir.done:
        pytest.skip("the same command ran above")
    run_command(workdir, command)


def check_not_run(command: str) -> None:
    """What can be checked without running: the script's flags (with --help) and torchrun's arguments."""
    _, words = split(command)
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])
        check_flags(Path(args.training_script).name, args.training_script_args)
    elif words[0] in ("python", "python3") and words[1].endswith(".py"):
        check_flags(words[1], words[2:])


def test_not_run_list_is_current_and_short():
    """Every NOT_RUN entry still matches a README command (no stale excuses), and nearly all commands run."""
    for pattern in NOT_RUN:
        assert any(pattern in c for _, c in COMMANDS), f"NOT_RUN entry {pattern!r} matches no README command"
    skipped = [c for _, c in COMMANDS if not_run_reason(c)]
    assert len(skipped) <= len(COMMANDS) // 4, skipped


def test_readme_starts_with_the_two_fresh_machine_commands():
    first = [c for _, c in COMMANDS[:5]]
    assert first[:2] == ["pip install -r requirements.txt", "python gpu_training_optimized.py"], first
    assert ci_test_command().split()[1:] == ["-m", "pytest", "-q"]
    assert "python -m pytest -q" in first, first


def test_readme_links_to_sections_that_exist():
    """[text](#anchor) links: GitHub's anchor of a heading is its text lower-cased, punctuation dropped, spaces to -."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in readme_headings()}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "the README links its sections"
    assert not links - anchors, f"links to no heading: {sorted(links - anchors)}"
    for image in re.findall(r"!\[[^\]]*\]\(([^)#:]+)\)", text):
        assert (ROOT / image).is_file(), image


# The README's Python examples run too (after the commands: they use the server and the exports those made),
# except fragments that use names the reader defines:
PYTHON_NOT_RUN = {"build_optimizer(model": "a fragment: `model`, `factor` and `matrices` are the reader's own"}
PYTHON_BLOCKS = [(section, text) for section, lang, text in readme_blocks() if lang == "python"]


@pytest.mark.parametrize("section,code", PYTHON_BLOCKS, ids=[s[:20] for s, _ in PYTHON_BLOCKS])
def test_readme_python_example_runs(workdir, section, code):
    why = next((w for pattern, w in PYTHON_NOT_RUN.items() if pattern in code), None)
    if why:
        compile(code, f"README {section}", "exec")  # still valid Python
        pytest.skip(why)
    if workdir.url:
        code = code.replace("http://127.0.0.1:8000", workdir.url)
    exec(compile(code, f"README {section}", "exec"), {"__name__": "readme_example"})
