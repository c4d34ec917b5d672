"""The side-by-side report of a comparison: a markdown table, PNG plots (held-out loss against step for every run;
leaf usage per layer for every tree), and a plain statement of who won."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TreeLoraUsageError
from .runner import RunResult

LOSS_PLOT = "heldout_loss.png"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def results_table(results: Sequence[RunResult], reference: str | None = None) -> str:
    """A markdown table of the runs; training time is given as a ratio to the `reference` run (default: the
    first)."""
    reference_result = next((r for r in results if r.name == reference), results[0] if results else None)
    rows = [
        "| run | trainable params | params active per token | final held-out loss | perplexity | train time | "
        "time ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        ratio = result.train_seconds / reference_result.train_seconds if reference_result.train_seconds > 0 else 0
        flag = " (interrupted)" if result.interrupted else ""
        rows.append(
            f"| {result.name}{flag} | {result.trainable_params:,} | {result.active_params_per_token:,} | "
            f"{result.final_eval_loss:.4f} | {result.final_perplexity:.2f} | {result.train_seconds:.0f} s | "
            f"{ratio:.2f} |"
        )
    return "\n".join(rows)


def verdict(results: Sequence[RunResult], tree_name: str | None) -> str:
    """One plain sentence per baseline: how the tree's final held-out loss compares with it."""
    tree = next((r for r in results if r.name == tree_name), None)
    if tree is None:
        return ""
    lines = []
    for other in results:
        if other is tree:
            continue
        difference = tree.final_eval_loss - other.final_eval_loss
        word = "lower (better)" if difference < 0 else "higher (worse)" if difference > 0 else "equal"
        lines.append(
            f"- {tree.name} ends {abs(difference):.4f} nats/token {word} than {other.name} "
            f"(perplexity {tree.final_perplexity:.2f} vs {other.final_perplexity:.2f})."
        )
    return "\n".join(lines)


def layer_usage(leaf_usage: dict[str, list[int]]) -> tuple[list[str], list[list[float]]]:
    """Leaf usage summed over the modules of each layer, as fractions per layer (rows in layer order)."""
    grouped: dict[str, list[int]] = {}
    order: dict[str, float] = {}
    for module, counts in leaf_usage.items():
        match = _LAYER_INDEX.search(module)
        label = f"layer {match.group(1)}" if match else module
        order[label] = int(match.group(1)) if match else -1
        total = grouped.setdefault(label, [0] * len(counts))
        for leaf, count in enumerate(counts):
            total[leaf] += count
    labels = sorted(grouped, key=lambda label: (order[label], label))
    fractions = [[c / max(sum(grouped[label]), 1) for c in grouped[label]] for label in labels]
    return labels, fractions


def plot_losses(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for result in results:
        steps = [point[0] for point in result.eval_curve]
        losses = [point[2] for point in result.eval_curve]
        axes.plot(steps, losses, marker="o", markersize=3, label=result.name)
    axes.set_xlabel("training step")
    axes.set_ylabel("held-out loss (nats/token)")
    axes.set_title("Held-out loss during training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_leaf_usage(result: RunResult, path: Path) -> Path:
    plt = _pyplot()
    labels, fractions = layer_usage(result.leaf_usage or {})
    leaves = len(fractions[0]) if fractions else 1
    figure, axes = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * leaves), max(2.8, 1.2 + 0.3 * len(labels))))
    image = axes.imshow(fractions or [[0.0]], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(leaves), [str(leaf) for leaf in range(leaves)])
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("leaf")
    axes.set_title(f"{result.name}\nshare of held-out tokens per leaf (hard routing)", fontsize=10)
    for row, values in enumerate(fractions):
        for leaf, value in enumerate(values):
            axes.text(
                leaf, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
            )
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(
    results: Sequence[RunResult],
    output_dir: Path,
    setup: dict[str, Any],
    reference: str | None = None,
    tree_name: str | None = None,
) -> Path:
    """Write `report.md` and its plots into `output_dir`; return the report's path. `setup` is a mapping of
    labels to values describing the run (command, model, data, steps, machine, wall time ...)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_losses(results, output_dir / LOSS_PLOT)
    lines = ["# TreeLoRA vs LoRA: side-by-side report", ""]
    lines += [f"- **{label}**: {value}" for label, value in setup.items()]
    lines += ["", "## Results", "", results_table(results, reference), ""]
    if results and results[0].eval_curve:
        lines.append(
            f"Held-out loss of the base model before training: {results[0].eval_curve[0][2]:.4f} "
            "(step 0 of every curve)."
        )
        lines.append("")
    said = verdict(results, tree_name)
    if said:
        lines += [said, ""]
    if any(r.interrupted for r in results):
        lines += ["**The comparison was interrupted**: runs marked so stopped early and are not comparable.", ""]
    lines += ["## Held-out loss against training step", "", f"![held-out loss]({LOSS_PLOT})", ""]
    lines += ["| step | tokens seen | " + " | ".join(r.name for r in results) + " |"]
    lines += ["| ---: | ---: | " + " | ".join("---:" for _ in results) + " |"]
    for index, point in enumerate(results[0].eval_curve if results else []):
        cells = [f"{r.eval_curve[index][2]:.4f}" if index < len(r.eval_curve) else "" for r in results]
        lines.append(f"| {point[0]} | {point[1]:,} | " + " | ".join(cells) + " |")
    lines.append("")
    for result in results:
        if result.leaf_usage:
            name = f"leaf_usage_{_slug(result.name)}.png"
            plot_leaf_usage(result, output_dir / name)
            lines += [
                f"## Leaf usage of {result.name}",
                "",
                "Share of held-out tokens that each leaf serves under hard (inference) routing, summed over the "
                "adapted modules of each layer. A row with one bright cell is a collapsed tree: every token takes "
                "the same leaf there.",
                "",
                f"![leaf usage]({name})",
                "",
            ]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def require_matplotlib(command: str) -> None:
    """Refuse, before any training, a command whose report needs plots when matplotlib is missing (it is in the
    package's `embedded` extra, not in its requirements)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise TreeLoraUsageError(
            f"{command} draws its plots with matplotlib, which is not installed: pip install matplotlib (or install "
            "peft-tree-lora with its 'embedded' extra, e.g. pip install \"/path/to/peft-tree-lora[embedded]\")."
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
