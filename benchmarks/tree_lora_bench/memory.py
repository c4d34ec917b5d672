"""Peak memory of a training step, one subprocess per configuration (see the package docstring)."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from .measure import REFERENCE, Series, training_step
from .variants import build_base, lora_variant, tree_variant

CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding `benchmarks/`: importable in the subprocess


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE).group(1))


def memory_probe(spec: dict) -> dict:
    """Build one configuration and measure its training steps; runs inside the subprocess."""
    torch.set_num_threads(spec["threads"])
    base = build_base(spec["shapes"])
    kind, value = spec["kind"], spec["value"]
    model = (
        lora_variant(base, value, spec["targets"])
        if kind == "lora"
        else tree_variant(base, value, kind, spec["targets"])
    )
    del base
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, spec["shapes"]["vocab_size"], (spec["batch"], spec["seq_len"]), generator=generator)
    step = training_step(model, input_ids)
    steps = []
    for _ in range(2):  # the first step also creates the optimiser state; the second is the steady state
        gc.collect()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        steps.append({"before_mb": before / 1024, "peak_mb": _status_kib("VmHWM") / 1024})
    return {"steps": steps}


def probe_main() -> None:
    print("MEMORY-PROBE " + json.dumps(memory_probe(json.loads(sys.argv[1]))))


def measure_memory(spec: dict, timeout: float) -> dict:
    code = f"import sys; sys.path.insert(0, {str(CHECKOUT)!r}); from {__name__} import probe_main; probe_main()"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY-PROBE "):
            return json.loads(line.removeprefix("MEMORY-PROBE "))
    raise RuntimeError(f"memory probe failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def memory_supported() -> bool:
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def memory_section(shapes: dict, targets, batch: int, seq_len: int, threads: int, log) -> list[Series]:
    configs = {REFERENCE: ("lora", 8), "TreeLoRA d=4 token": ("token", 4), "LoRA r=128": ("lora", 128)}
    probes = {}
    for name, (kind, value) in configs.items():
        log(f"peak memory: {name} (own subprocess)")
        spec = dict(
            kind=kind, value=value, shapes=shapes, targets=targets, batch=batch, seq_len=seq_len, threads=threads
        )
        probes[name] = measure_memory(spec, timeout=1800)
    results = []
    sections = (
        ("peak memory, training step", 1, "peak_mb"),  # the steady state: the optimiser state exists already
        ("peak memory, first training step", 0, "peak_mb"),  # it also allocates the optimiser state
        ("memory added by a training step", 1, "added_mb"),
    )
    for section, step_index, key in sections:
        reference = _memory_figure(probes[REFERENCE]["steps"][step_index], key)
        for name, probe in probes.items():
            figure = _memory_figure(probe["steps"][step_index], key)
            results.append(Series(section, name, [figure], [figure / reference], unit="MB"))
    return results


def _memory_figure(step: dict, key: str) -> float:
    return step["peak_mb"] - step["before_mb"] if key == "added_mb" else step["peak_mb"]
