"""
What every script shares: the command-line convention and the machine it runs on.

The convention: a script's settings are UPPER_CASE constants at its top, one per line with a comment, followed by
`_FLAG_DEFAULTS = settings_block(globals())`. Those constants, and only those, are its flags: `--lower_name=value`
overrides one (type-checked against the constant), `--help` prints them with their comments, and a mistake a
user can make is a `UserError`, printed by `run_main` as one line naming the README section that explains it,
with exit code 2.

The machine: which device to run on, which dtype to compute in, and the FLOP/s that MFU divides by, each decided
here once for every script.
"""

from __future__ import annotations

import ast
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

# -----------------------------------------------------------------------------
# Errors a user can cause


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file, bad checkpoint).

    Scripts print it as one line that names the README section explaining it, and exit with code 2;
    no traceback, because the traceback would only hide the message.
    """

    def __init__(self, message: str, section: str = "Troubleshooting"):
        super().__init__(message)
        self.section = section

    def __str__(self) -> str:
        return f"{self.args[0]} (see README: {self.section})"


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a script's main(argv), turning UserError into a one-line message and exit code 2."""
    sys.stdout.reconfigure(errors="backslashreplace")  # a path that is not UTF-8 prints, as it does on stderr
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def utf8_text(text: str, flag: str) -> str:
    """Text a flag passes on as text (a prompt, a stop string): Python keeps bytes that are not UTF-8 in argv as
    lone surrogates, which tokenizers and JSON refuse deep inside; say so here instead. Paths may be any bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{flag} is not UTF-8 text (character {e.start + 1} is a raw byte): set the terminal to "
                        "UTF-8, or put the text in a UTF-8 file", "Configuration") from None
    return text


# -----------------------------------------------------------------------------
# Output paths: checked before any work, so a run does not fail at its end on a path it could have refused


def temp_dir(prefix: str, parent: Path) -> Path:
    """mkdtemp in `parent`, with the permissions the umask gives a folder: mkdtemp makes it owner-only, and a
    folder renamed into place from it (a checkpoint, a data folder) must be as readable as any other."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def existing_ancestor(path: Path) -> Path:
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def check_output_path(path: str | Path, flag: str, folder: bool = True, beside: bool = False) -> Path:
    """Refuse in one line, naming `flag` (a flag, or what the path is), an output path the script could not write:
    a file where a folder is wanted (folder) or the reverse, a parent that is a file, a dangling link, a name the
    file system refuses, or a place this user cannot write. Writing is probed (a temporary folder made and
    removed): permission bits say nothing for root or a read-only mount. The folder itself is probed when it
    exists; its parent when it does not, or when the output is renamed into place from beside it (`beside`: a
    final model, an export)."""
    path = Path(path).expanduser()
    want = "folder" if folder else "file"
    where = f"{flag}={path}" if flag.startswith("--") else f"{path} ({flag})"
    try:
        if path.is_symlink() and not path.exists():
            raise UserError(f"{where} is a link to something missing: remove it or name another {want}",
                            "Configuration")
        if path.exists() and (path.is_dir() != folder or not (path.is_dir() or path.is_file())):
            kind = "a folder" if path.is_dir() else "a file" if path.is_file() else "a device or pipe"
            raise UserError(f"{where} is {kind}, not a {want}: name a {want} (or remove what is there)",
                            "Configuration")
        ancestor = existing_ancestor(path.parent)
        if not ancestor.is_dir():
            raise UserError(f"{where}: {ancestor} is a file, so it cannot hold a {want}: name another path",
                            "Configuration")
        for place in ([path] if path.is_dir() else []) + ([ancestor] if beside or not path.exists() else []):
            os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=place))
    except OSError as e:
        raise UserError(f"{where}: cannot write there ({e.strerror}): name a {want} you can write",
                        "Configuration") from None
    return path


# -----------------------------------------------------------------------------
# Flags: the settings block at the top of a script


def assigned_names(path: str) -> list[str]:
    """UPPER_CASE names a script assigns at its top level, in order (not those it imports)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    targets = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    targets += [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
    return [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]


def settings_block(module_globals: dict) -> dict[str, Any]:
    """The script's flags: the UPPER_CASE constants it has assigned so far, in order. Call it right after the
    settings block, so that constants further down (tables, file names) stay out of the command line."""
    own = set(assigned_names(module_globals["__file__"]))
    return {k: v for k, v in module_globals.items()
            if k in own and isinstance(v, (bool, int, float, str, list, type(None)))}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, text: str, default: Any) -> Any:
    """Parse a flag's text into the type of the constant it overrides."""
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}", "Configuration")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name} expects an integer, got {text!r}", "Configuration") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}", "Configuration") from None
        if not math.isfinite(value):  # no setting means anything at NaN or infinity
            raise UserError(f"--{name} expects a finite number, got {text!r}", "Configuration")
        return value
    if default is None and text.lower() in ("none", ""):
        return None
    return text


def parse_flags(defaults: dict[str, Any], argv: list[str], script: str | None = None,
                usage: str = "") -> tuple[dict[str, Any], set[str]]:
    """Override a script's constants from `--lower_case_name=value` flags.

    Returns (config, given): config maps lower-case names to values, given is the set of names the user typed,
    so hardware presets can fill in only what the user did not set. A list-valued constant is repeatable:
    each `--name=value` appends. `--help` prints every constant with its value and comment, then exits.
    """
    config = {k.lower(): (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print_help(defaults, script, usage)
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --name=value", "Configuration")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_").lower()
        if name not in config:
            valid = ", ".join(f"--{k}" for k in config)
            raise UserError(f"unknown flag --{name}; valid flags: {valid}", "Configuration")
        default = defaults[name.upper()]
        if not has_value:
            if isinstance(default, bool):
                text = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                text = argv[i]
                i += 1
            else:
                raise UserError(f"--{name} needs a value: --{name}=VALUE", "Configuration")
        if isinstance(default, list):
            config[name] = (config[name] if name in given else []) + [text]
        else:
            config[name] = _convert(name, text, default)
        given.add(name)
    return config, given


def constant_comments(path: str) -> dict[str, str]:
    """The `# comment` after each `NAME = value` line at the top level of a script, for --help."""
    comments = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.*?)\s+#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(3)
    return comments


def print_help(defaults: dict[str, Any], script: str | None, usage: str = "") -> None:
    comments = constant_comments(script) if script else {}
    if usage:
        print(usage.strip() + "\n")
    print("Flags (each overrides the constant of the same name at the top of the script):")
    for k, v in defaults.items():
        print(f"  --{k.lower()}={v!r:<24} {comments.get(k, '')}")


# -----------------------------------------------------------------------------
# The machine: device, dtype, peak FLOP/s


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA, else Apple MPS, else CPU) or a named device that this machine really has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name!r} is not a device: use cpu, cuda, cuda:N or mps", "Configuration") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device=cuda, but PyTorch sees no CUDA GPU (a CPU-only build, or no driver): "
                            "use --device=cpu, or install the CUDA build of PyTorch", "Configuration")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device={name}: there are only {torch.cuda.device_count()} GPUs", "Configuration")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but this machine has no Apple GPU backend: use --device=cpu", "Configuration")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name!r}: only cpu, cuda and mps are supported", "Configuration")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at ~2-4x fp32 (~2.7x training speed on a Zen 5 CPU); without them
    bf16 is emulated and slower than fp32. (torch.cpu's probes are private, so absent ones count as no.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(name: str, device: torch.device, cpu_bf16: bool = True) -> torch.dtype:
    """The dtype to compute in. `auto`: bf16 on GPUs that have it natively, else fp16 (training adds loss
    scaling); on a CPU bf16 where it has bf16 units and `cpu_bf16` (fp32 where the caller wants fp32's exact
    figures by default), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16 and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype={name!r} is not one of: auto, {', '.join(DTYPES)}", "Configuration")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("this GPU has no bf16: use --dtype=float16 (loss scaling is automatic) or --dtype=float32",
                        "bf16 is not supported")
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often empty or just "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Dense peak TFLOP/s (fp32, tf32, bf16 with fp32 accumulation) from NVIDIA's data sheets, for MFU. The first name
# contained in the device's name wins, so "H100 PCIe" comes before "H100". Other devices: a measured matmul.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": (51.0, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "RTX 4090": (82.6, 82.6, 165.2),
    "RTX 4080": (48.7, 48.7, 97.5),
    "RTX 4070 Ti": (40.1, 40.1, 80.2),
    "RTX 3090": (35.6, 35.6, 71.0),
    "RTX 3060": (12.7, 12.7, 25.6),
}


def datasheet_flops(name: str) -> dict[str, float] | None:
    """{"fp32", "tf32", "bf16"} -> FLOP/s of a GPU we know by name, else None."""
    for key, (fp32, tf32, bf16) in GPU_PEAK_TFLOPS.items():
        if key in name:
            return {"fp32": fp32 * 1e12, "tf32": tf32 * 1e12, "bf16": bf16 * 1e12}
    return None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n matmuls: the practical peak where no data sheet applies (a CPU's depends
    on its cores, clock, AVX-512/AMX units and BLAS)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call: library and thread-pool start-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str, n: int = 1024) -> tuple[float, str]:
    """(FLOP/s that MFU divides by, where the figure comes from) for precision fp32, tf32 or bf16: a GPU's data
    sheet when we know it, else a matmul measured once (a CPU's peak depends on its cores, clock and BLAS)."""
    name = device_name(device)
    sheet = datasheet_flops(name) if device.type == "cuda" else None
    if sheet:
        return sheet[precision], f"{name} data sheet (dense)"
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"  # fp32 products on tensor cores, or not
    try:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measured_matmul_flops(device, dtype, n), f"measured {n}x{n} matmul"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextmanager
def stop_requests():
    """Ctrl-C and SIGTERM ask the loop to stop at the next step boundary, where it saves a checkpoint; a second
    Ctrl-C interrupts at once. Yields the list the signal names are appended to."""
    requested: list[str] = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)
