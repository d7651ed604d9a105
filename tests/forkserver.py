"""Runs a script the way `python script.py ARGS` would, in a child forked from one process that imported torch,
transformers and the project's modules once: tests/test_bad_inputs.py runs ~90 short commands, and a fresh
interpreter spends most of a short command importing (about 3 s each on a 2-core CPU, against a fork's few ms).

The server reads requests on stdin (one pickled dict at a time: argv as bytes, cwd, env, the files that stand for
stdout and stderr, a timeout) and answers each on stdout with one line: the child's exit code as subprocess reports
it (negative: the signal that ended it), or "timeout" when it ran too long and was killed. The child does what the
interpreter does at start-up: the working folder, the environment, stdin on /dev/null and stdout/stderr on the
files, sys.argv decoded from the bytes with os.fsdecode, sys.path[0] the script's folder, and the script run as
__main__; it ends with os._exit once its output is flushed (the server's atexit handlers are not its own). The
server's own environment must be the one the commands get, since some libraries read variables at import
(huggingface_hub's HF_HUB_OFFLINE, for one)."""

import os
import pickle
import queue
import runpy
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preload() -> None:
    """Everything the scripts import, the parts they import lazily included (transformers' Llama classes, torch's
    compiler), then the project's modules: its scripts are modules too. Not `datasets`: pyarrow starts a thread,
    and a fork keeps only the thread that called it, so a lock another thread held stays locked in the child."""
    sys.path[0] = str(ROOT)
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch._dynamo  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    for path in sorted(ROOT.glob("*.py")):
        __import__(path.stem)
    assert os.listdir("/proc/self/task") == [str(os.getpid())], "an import started a thread: forking is unsafe"


def exit_code(e: SystemExit) -> int:
    """The exit status the interpreter gives an uncaught SystemExit."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def child(request: dict) -> None:
    """Runs in the forked child and never returns."""
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write),
                                (2, request["stderr"], write)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = [os.fsdecode(a) for a in request["argv"]]
        sys.path[0] = os.path.dirname(sys.argv[0])
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = exit_code(e)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # as the interpreter does: the traceback on stderr, exit status 1
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    os._exit(code)


def serve() -> None:
    preload()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        pid = os.fork()
        if pid == 0:
            child(request)
        exited = os.pidfd_open(pid)  # readable once the child has exited
        ran_out = not select.select([exited], [], [], request["timeout"])[0]
        if ran_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(exited)
        answers.write(b"timeout\n" if ran_out else f"{os.waitstatus_to_exitcode(status)}\n".encode())
        answers.flush()


class ForkServer:
    """The caller's side: one server process, one command at a time, its output in files in `scratch`."""

    def __init__(self, env: dict, scratch: Path):
        self.scratch = scratch
        scratch.mkdir(parents=True)
        self.proc = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def run(self, argv: list, cwd: Path, env: dict, timeout: float) -> tuple[int | None, bytes, bytes]:
        """(exit code, stdout, stderr) of `python script.py ARGS` (argv: [sys.executable, script, *ARGS]), as
        subprocess.run gives them; the exit code is None when it ran past `timeout` seconds and was killed."""
        assert argv[0] == sys.executable, argv[0]
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        pickle.dump({"argv": [os.fsencode(a) for a in argv[1:]], "cwd": str(cwd), "env": env, "stdout": str(out),
                     "stderr": str(err), "timeout": timeout}, self.proc.stdin)
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server ended (exit code {self.proc.wait()}); its stderr says why")
        return None if answer == b"timeout\n" else int(answer), out.read_bytes(), err.read_bytes()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


class ForkServers:
    """n servers, for n threads: run() takes one that is free."""

    def __init__(self, n: int, env: dict, scratch: Path):
        self.free = queue.SimpleQueue()
        for i in range(n):
            self.free.put(ForkServer(env, scratch / str(i)))
        self.n = n

    def run(self, argv: list, cwd: Path, env: dict, timeout: float) -> tuple[int | None, bytes, bytes]:
        server = self.free.get()
        try:
            return server.run(argv, cwd, env, timeout)
        finally:
            self.free.put(server)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _ in range(self.n):
            self.free.get().close()


if __name__ == "__main__":
    serve()
