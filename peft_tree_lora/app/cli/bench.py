"""`tree-lora bench`: runs the benchmark of a source checkout (`benchmarks/tree_lora_bench/`).

The benchmark is not part of the installed package. It is found as the importable package
`benchmarks.tree_lora_bench` (running from the checkout's root), or in the checkout this package was imported from
(an editable install or PYTHONPATH); otherwise `tree-lora bench` says to run it from a source checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ...tuner.errors import TreeLoraUsageError

BENCHMARK = "benchmarks.tree_lora_bench"
NOT_FOUND = (
    "`tree-lora bench` runs the benchmark in benchmarks/tree_lora_bench/ of the source checkout, which is not "
    "installed with the package: run it from a checkout (git clone the project, pip install -e ., then "
    "`tree-lora bench` or `python benchmarks/bench_tree_lora.py` there)."
)


def find_benchmark():
    """The benchmark's module, or None when no source checkout provides it. An import error inside the benchmark
    itself is raised, not taken for its absence."""
    module = _import_benchmark()
    if module is not None:
        return module
    package_checkout = Path(__file__).resolve().parents[3]
    for root in dict.fromkeys((package_checkout, Path.cwd().resolve())):
        if (root / "benchmarks" / "tree_lora_bench" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return _import_benchmark()
    return None


def _import_benchmark():
    try:
        return importlib.import_module(BENCHMARK)
    except ModuleNotFoundError as error:
        if error.name in ("benchmarks", BENCHMARK):
            return None
        raise


def configure_parser(parser: argparse.ArgumentParser) -> None:
    benchmark = find_benchmark()
    if benchmark is None:
        parser.unavailable = NOT_FOUND  # `tree-lora bench ...`, whatever follows, ends in this message
        parser.set_defaults(benchmark=None)
        return
    benchmark.configure_parser(parser)
    parser.set_defaults(benchmark=benchmark)


def run(args: argparse.Namespace) -> int:
    if args.benchmark is None:
        raise TreeLoraUsageError(NOT_FOUND)
    return args.benchmark.run(args)
