"""The layers of the package import downwards only, and no module grows past 400 lines.

tuner (the PEFT method) <- integrations (Trainer, Hub, export) <- app (command line, runs) <- experiments; the
benchmarks in `benchmarks/` sit outside the installed package. The command line names the experiments and the
benchmark in its sub-command tables as module-name strings, imported by `importlib` when that command runs: that is
not an import statement, and nothing here counts it as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "peft_tree_lora").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]

# layer -> what it must never import (a name or anything below it)
FORBIDDEN = {
    "peft_tree_lora.tuner": (
        "peft_tree_lora.integrations",
        "peft_tree_lora.app",
        "peft_tree_lora.experiments",
        "benchmarks",
    ),
    "peft_tree_lora.integrations": ("peft_tree_lora.app", "peft_tree_lora.experiments", "benchmarks"),
    "peft_tree_lora.app": ("peft_tree_lora.experiments", "benchmarks"),
}

MAX_LINES = 400
LONG_MODULES: set[str] = set()  # modules allowed past MAX_LINES, each with its reason (none today)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in `path` names, relative imports resolved, anywhere in the file (imports
    inside functions too). For `from x import y`, both `x` and `x.y` (y may be a module)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imports_are_resolved_to_absolute_module_names():
    cli = imports_of(ROOT / "peft_tree_lora" / "app" / "cli" / "__init__.py")
    assert "peft_tree_lora.errors" in cli and "importlib" in cli
    train = imports_of(ROOT / "peft_tree_lora" / "app" / "cli" / "train.py")
    assert {"peft_tree_lora.app.cli.options", "peft_tree_lora.app.runner", "peft_tree_lora.tuner.routing"} <= train
    assert "peft_tree_lora.integrations.hub" in train  # imported inside a function: still found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    wrong = []
    for path in SOURCES:
        if within(module_name(path), layer):
            for imported in sorted(imports_of(path)):
                if any(within(imported, forbidden) for forbidden in FORBIDDEN[layer]):
                    wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert wrong == []


def test_the_command_line_reaches_the_experiments_and_the_benchmark_by_name_only():
    cli = (ROOT / "peft_tree_lora" / "app" / "cli" / "__init__.py").read_text()
    bench = (ROOT / "peft_tree_lora" / "app" / "cli" / "bench.py").read_text()
    assert '"peft_tree_lora.experiments"' in cli and 'BENCHMARK = "benchmarks.tree_lora_bench"' in bench


def test_no_module_is_longer_than_400_lines():
    long = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in SOURCES
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert {name: lines for name, lines in long.items() if name not in LONG_MODULES} == {}
