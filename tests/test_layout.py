"""The layout stays as DESIGN says: one rule for flags, imports that go one way, files a reader can hold."""

import ast
import importlib
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = sorted(p for p in ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("[!_]*.py"))
PROJECT = {p.stem for p in ROOT.glob("*.py")} | {f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py")}

# Each file may import only from files below it: the command-line convention, the model, the checkpoint format,
# data and sampling, the generation engine, then training and generation, then the server; measurements
# (benchmarks/ and their entry point) may import anything.
LAYERS = [
    {"cli", "cross_entropy"},
    {"modern_llm", "muon_optimizer", "schedule"},
    {"checkpoint", "corpora", "distributed", "monitor"},
    {"prepare_data", "training_state", "sampling"},
    {"engine"},
    {"speculative"},
    {"gpu_training_optimized", "text_generator", "evaluate_model", "export_model", "serve_requests"},
    {"serve"},
    {"speed_optimizations_2025"} | {m for m in PROJECT if m.startswith("benchmarks.")},
]


def module_name(path: Path) -> str:
    return f"benchmarks.{path.stem}" if path.parent.name == "benchmarks" else path.stem


def imports(path: Path) -> set[str]:
    """Project modules a file imports, at the top or inside functions; a production script's `--benchmark` (its
    one-line call into benchmarks/) is the one edge allowed upwards and is left out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {n for n in names if n in PROJECT}
    if not module_name(path).startswith("benchmarks.") and path.stem != "speed_optimizations_2025":
        found = {n for n in found if not n.startswith("benchmarks.")}
    return found


def layer(name: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if name in group)


def test_every_file_has_a_layer():
    unknown = [module_name(p) for p in SCRIPTS if not any(module_name(p) in group for group in LAYERS)]
    assert not unknown, f"add {unknown} to LAYERS (and to DESIGN.md's table)"


def test_imports_go_one_way():
    wrong = [f"{module_name(p)} imports {m}" for p in SCRIPTS for m in imports(p)
             if layer(m) >= layer(module_name(p)) and m != module_name(p)
             and not (layer(m) == layer(module_name(p)) == len(LAYERS) - 1)]
    assert not wrong, wrong


def settings_names(path: Path) -> list[str] | None:
    """The UPPER_CASE names assigned before `_FLAG_DEFAULTS = settings_block(globals())`, or None without one."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "_FLAG_DEFAULTS":
                return names
            if isinstance(t, ast.Name) and t.id.isupper():
                names.append(t.id)
    return None


@pytest.mark.parametrize("path", [p for p in SCRIPTS if settings_names(p) is not None], ids=lambda p: p.name)
def test_flags_are_exactly_the_settings_block(path):
    module = importlib.import_module(module_name(path))
    assert list(module._FLAG_DEFAULTS) == settings_names(path)
    assert all(isinstance(v, (bool, int, float, str, list, type(None))) for v in module._FLAG_DEFAULTS.values())


def test_every_entry_point_has_a_settings_block_or_delegates():
    """Scripts users run take flags; the model file prints its presets, muon_optimizer.py runs its benchmark."""
    entry = ["gpu_training_optimized", "text_generator", "serve", "prepare_data", "export_model", "evaluate_model",
             "speed_optimizations_2025"]
    assert all(settings_names(ROOT / f"{name}.py") for name in entry)
    assert "from benchmarks.muon import main" in (ROOT / "muon_optimizer.py").read_text(encoding="utf-8")


def test_files_stay_small():
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in SCRIPTS}
    assert lines["modern_llm.py"] <= 450, lines["modern_llm.py"]
    too_long = {name: n for name, n in lines.items() if n > 750}
    assert not too_long, too_long
