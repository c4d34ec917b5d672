"""What a run reports: the machine, the table of every figure, the performance targets, the plot."""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path

import torch

from .measure import Series


def machine_info(threads: int) -> dict[str, str]:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "torch threads": str(threads),
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def summarise(s: Series) -> tuple[str, str]:
    if s.unit == "tok/s":
        value = f"{statistics.median(s.seconds):.1f} tok/s"
    elif s.unit == "MB":
        value = f"{statistics.median(s.seconds):.0f} MB"
    else:
        value = f"{statistics.median(s.seconds):.3f} s"
    if not s.ratios:
        return value, "-"
    return value, f"{statistics.median(s.ratios):.3f} ({min(s.ratios):.3f} - {max(s.ratios):.3f})"


def table(results: list[Series]) -> str:
    lines = [
        "| measurement | variant | median | ratio to LoRA r=8, median (min - max) |",
        "| --- | --- | --- | --- |",
    ]
    for s in results:
        value, ratio = summarise(s)
        lines.append(f"| {s.section} | {s.name} | {value} | {ratio} |")
    return "\n".join(lines)


def median_ratio(results: list[Series], section: str, name: str) -> float | None:
    for s in results:
        if s.section == section and s.name == name and s.ratios:
            return statistics.median(s.ratios)
    return None


def targets_table(results: list[Series]) -> str:
    """The performance targets against this run's medians."""
    fwd = "eval forward"
    rows = []

    def add(what: str, value: float | None, limit: str, ok: bool | None) -> None:
        shown = "not measured" if value is None else f"{value:.3f}"
        verdict = "-" if ok is None else ("met" if ok else "missed")
        rows.append(f"| {what} | {shown} | {limit} | {verdict} |")

    for routing, limit in (("token", 1.10), ("block", 1.10), ("sequence", 1.05)):
        value = median_ratio(results, fwd, f"TreeLoRA d=4 {routing}")
        ok = None if value is None else value <= limit
        add(f"eval forward, {routing} routing d=4 / LoRA r=8", value, f"<= {limit:.2f}", ok)
    for routing in ("token", "block", "sequence"):
        d8 = median_ratio(results, fwd, f"TreeLoRA d=8 {routing}")
        d1 = median_ratio(results, fwd, f"TreeLoRA d=1 {routing}")
        value = None if d8 is None or d1 is None else d8 / d1
        add(f"eval forward, {routing} routing d=8 / d=1", value, "<= 1.15", None if value is None else value <= 1.15)
    train128 = median_ratio(results, "training step", "LoRA r=128")
    for routing, mode in (
        ("token", "hard"),
        ("token", "switch"),
        ("token", "soft"),
        ("block", "hard"),
        ("block", "switch"),
    ):
        train4 = median_ratio(results, "training step", f"TreeLoRA d=4 {routing}, {mode} training")
        label = mode if routing == "token" else f"{routing} routing, {mode}"
        add(
            f"training step d=4, {label} training / LoRA r=8",
            train4,
            "<= 1.2",
            None if train4 is None else train4 <= 1.2,
        )
        value = None if train4 is None or train128 is None else train4 / train128
        ok = None if value is None else value < 1.0
        add(f"training step d=4, {label} training / LoRA r=128", value, "< 1.0", ok)
    for routing, floor in (("token", 0.9), ("block", 0.9), ("sequence", 0.95)):
        gen = median_ratio(results, "generate", f"TreeLoRA d=4 {routing}")
        ok = None if gen is None else gen >= floor
        add(f"generate tokens/s, {routing} routing d=4 / LoRA r=8", gen, f">= {floor}", ok)
    mem = median_ratio(results, "peak memory, training step", "TreeLoRA d=4 token")
    add("peak training-step memory d=4 / LoRA r=8", mem, "<= 1.3", None if mem is None else mem <= 1.3)
    head = "| target | this run | target | verdict |\n| --- | --- | --- | --- |\n"
    return head + "\n".join(rows)


def plot(results: list[Series], depths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for routing, marker in (("token", "o"), ("block", "^"), ("sequence", "s")):
        xs, ys, lo, hi = [], [], [], []
        for depth in depths:
            for s in results:
                if s.section == "eval forward" and s.name == f"TreeLoRA d={depth} {routing}":
                    xs.append(depth)
                    ys.append(statistics.median(s.ratios))
                    lo.append(ys[-1] - min(s.ratios))
                    hi.append(max(s.ratios) - ys[-1])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=f"TreeLoRA r=8, {routing} routing")
    ax.axhline(1.0, color="black", lw=1, label="PEFT LoRA r=8")
    for name, style in (("base model", ":"), ("X-LoRA", "--")):
        for s in results:
            if s.section == "eval forward" and s.name.startswith(name):
                ax.axhline(statistics.median(s.ratios), color="grey", ls=style, lw=1, label=s.name)
    ax.set_xlabel("tree depth (2**depth leaves per target module)")
    ax.set_ylabel("evaluation forward time / PEFT LoRA r=8")
    ax.set_title("Hard-routed evaluation forward, same run (median, min-max)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_page(
    command: str,
    setup: str,
    info: dict[str, str],
    notes: list[str],
    verdicts: str,
    body: str,
    plot_name: str | None,
) -> str:
    """The markdown page `results.md`: how the run was made, the targets, every figure and the plot."""
    page = [
        "# TreeLoRA benchmark results",
        "",
        f"Written by `{command}` (`benchmarks/tree_lora_bench/`). {setup}",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        *[f"- note: {note}" for note in notes],
        "",
        "## Targets",
        "",
        verdicts,
        "",
        "## All figures",
        "",
        "Times are medians over rounds; each ratio is taken against LoRA r=8 of the same round, then summarised as "
        "median (min - max). Generate: throughput and throughput ratio (higher is better). Memory: one subprocess "
        "per configuration, peak resident memory of a training step (see the docstring of "
        "`benchmarks/tree_lora_bench/__init__.py`).",
        "",
        body,
        "",
    ]
    if plot_name is not None:
        page += [f"![evaluation forward time against depth]({plot_name})", ""]
    return "\n".join(page)
