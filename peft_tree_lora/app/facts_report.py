"""The main job's outputs: the final table, the computed verdict, `report.md`, `results.json` and the plots, each
written to a temporary file and moved into place."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..integrations.optim import router_lr_ratio_for
from .runner import RunResult

RESULTS_FILE = "results.json"


REPORT_FILE = "report.md"


RECALL_PLOT = "recall.png"


LOSS_PLOT = "heldout_loss.png"


LEAF_PLOT = "leaf_usage_tree.png"


def results_table(data: dict[str, Any]) -> str:
    rows = [
        "| arm | held-out recall | seen-paraphrase recall | held-out loss | active params / token | "
        "trainable params | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in data["arms"]:
        flag = " (interrupted)" if run["interrupted"] else ""
        rows.append(
            f"| {run['label']}{flag} | {run['recall_held_out']:.1%} ({run['facts_recalled']}/{data['facts']}) | "
            f"{run['recall_seen_paraphrase']:.1%} | {run['held_out_loss']:.3f} | "
            f"{run['active_params_per_token']:,} | {run['trainable_params']:,} | {run['train_seconds']:.0f} s |"
        )
    return "\n".join(rows)


def noise(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two recall rates over `n` facts each (a rough guide: the arms
    answer the same facts, so this overstates the noise of a paired comparison a little)."""
    return 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))


def verdict(data: dict[str, Any]) -> str:
    """Plain sentences, one per comparison: is the setting capacity-bound (LoRA r vs LoRA r*2**d), where does the
    tree stand against each LoRA, and which differences are within noise (two standard errors)."""
    runs = {run["key"]: run for run in data["arms"]}
    settings = data["settings"]
    small, wide = runs.get(f"lora_r{settings['rank']}"), runs.get(f"lora_r{settings['rank'] * 2 ** settings['depth']}")
    tree, matched = runs.get("tree"), runs.get("compute_matched")
    facts = data["facts"]
    lines = []

    def compared(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
        gap = a["recall_held_out"] - b["recall_held_out"]
        margin = noise(a["recall_held_out"], b["recall_held_out"], facts)
        word = f"{gap:.1%} more" if gap > 0 else f"{-gap:.1%} fewer" if gap < 0 else "as many"
        if abs(gap) < margin:
            word += f" (within noise: 2 s.e. = {margin:.0%} on {facts} facts)"
        return gap, margin, word

    if small and wide:
        gap, margin, word = compared(wide, small)
        bound = "capacity-bound" if gap >= max(margin, 0.05) else "NOT clearly capacity-bound"
        lines.append(
            f"- {wide['label']} recalls {word} held-out facts than {small['label']} "
            f"({wide['recall_held_out']:.1%} vs {small['recall_held_out']:.1%}): at LoRA r={settings['rank']} this "
            f"setting is {bound}."
        )
    if tree:
        for other in (small, matched, wide):
            if other is None:
                continue
            _, _, word = compared(tree, other)
            lines.append(
                f"- {tree['label']} ({tree['active_params_per_token']:,} params active per token) recalls {word} "
                f"held-out facts than {other['label']} ({other['active_params_per_token']:,} per token): "
                f"{tree['recall_held_out']:.1%} vs {other['recall_held_out']:.1%}; held-out loss "
                f"{tree['held_out_loss']:.3f} vs {other['held_out_loss']:.3f}."
            )
    if data["arms"]:
        best_seen = max(run["recall_seen_paraphrase"] for run in data["arms"])
        if best_seen < 0.9:
            lines.append(
                f"- No arm memorised every fact (best seen-paraphrase recall {best_seen:.0%}): the run is limited by "
                "its steps as well as by adapter capacity."
            )
    return "\n".join(lines)


def write_outputs(data: dict[str, Any], results: Sequence[RunResult], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    data["plots"] = plots = {}
    if results:
        from .report import plot_leaf_usage, plot_losses

        _atomic_plot(lambda path: plot_recall(data, path), output / RECALL_PLOT)
        _atomic_plot(lambda path: plot_losses(results, path), output / LOSS_PLOT)
        plots.update(recall=RECALL_PLOT, held_out_loss=LOSS_PLOT)
    tree = next((r for r, run in zip(results, data["arms"]) if run["kind"] == "tree" and r.leaf_usage), None)
    if tree is not None:
        _atomic_plot(lambda path: plot_leaf_usage(tree, path), output / LEAF_PLOT)
        plots["leaf_usage"] = LEAF_PLOT
    atomic_text(output / RESULTS_FILE, json.dumps(data, indent=1) + "\n")
    atomic_text(output / REPORT_FILE, report_markdown(data))


def report_markdown(data: dict[str, Any]) -> str:
    settings = data["settings"]
    wide = settings["rank"] * 2 ** settings["depth"]
    matched = data["compute_matched"]
    layers = data["layers"]
    routing = settings.get("routing", "token")  # results written before 0.3 did not record it: token then
    ratio = router_lr_ratio_for(routing, settings["rank"], settings.get("router_lr_ratio"))
    lines = [
        "# Synthetic facts: LoRA vs TreeLoRA",
        "",
        f"- **command**: `{data['command']}`",
        f"- **model**: {data['model']}",
        f"- **facts**: {data['people']} synthetic people x {len(data['attributes'])} facts = {data['facts']} facts "
        "the model cannot know (random names and values); four paraphrases per fact; training shows three of them "
        f"({settings['epochs']} short biographies per person, one statement per fact, the paraphrase rotating), "
        "recall is asked in the fourth, which training never showed for that person",
        f"- **training** (every arm): {data['steps']} steps x {settings['batch_size']} documents "
        f"(up to {data['documents']['train'][1]} tokens, padded), AdamW, lr {data['learning_rate']:g} "
        f"with {int(data['steps'] * settings['warmup_fraction'])} warm-up steps and linear decay, seed "
        f"{settings['seed']}",
        f"- **adapters**: {', '.join(data['target_modules'])} in "
        + (f"layers {', '.join(map(str, layers))}" if layers else "every layer")
        + f"; alpha = 2 x rank; tree: depth {settings['depth']}, rank {settings['rank']}, {routing} routing, hard "
        f"training routing (trains the served function), routers at {ratio:g}x the learning rate, hard at "
        "evaluation",
        f"- **compute-matched LoRA**: the tree touches {matched['tree_active_per_token']:,} adapter parameters "
        f"per token (one leaf per module plus the {settings['depth']} routers on its path); LoRA has "
        f"{matched['lora_params_per_rank']:,} parameters per rank, so rank {matched['rank']} is the smallest "
        "with at least as many",
        f"- **base model before training**: {data['base_recall_held_out']:.1%} held-out-paraphrase recall",
        f"- **machine**: {data['machine']}",
        f"- **wall time**: {data['wall_seconds'] / 60:.1f} min (loading, training and evaluating every run)",
        "",
    ]
    selection = data["lr_selection"]
    if selection:
        lines += [
            "## Learning rate (chosen on validation people)",
            "",
            f"LoRA r={settings['rank']} and LoRA r={wide} were trained at each rate on "
            f"{selection['validation_people']} validation people (other names and facts than the test people); "
            f"the rate with the best mean validation recall is used for every arm: **{selection['chosen']:g}**.",
            "",
            "| lr | arm | validation held-out recall | held-out loss |",
            "| ---: | --- | ---: | ---: |",
        ]
        lines += [
            f"| {r['lr']:g} | {r['arm']} | {r['recall_held_out']:.1%} | {r['held_out_loss']:.3f} |"
            for r in selection["rows"]
        ]
        lines.append("")
    else:
        lines += [
            f"The learning rate {data['learning_rate']:g} was chosen beforehand with `--lr-sweep` on validation "
            "people (see the job module's docstring), not on these test people.",
            "",
        ]
    if not data["arms"]:
        return "\n".join(lines)
    lines += ["## Results", "", results_table(data), "", data["verdict"], ""]
    lines += [
        "Recall is exact match of the value and its full stop, greedy, with the prompt fed in (one forward pass). "
        "Held-out loss is the mean next-token loss on documents stating each person's facts in the held-out "
        "paraphrases (padding included, the same for every arm). Train times are wall-clock on a shared "
        "machine; they say little.",
        "",
        "## Recall by fact",
        "",
        "| arm | " + " | ".join(data["attributes"]) + " |",
        "| --- | " + " | ".join("---:" for _ in data["attributes"]) + " |",
    ]
    for run in data["arms"]:
        accuracy = run["accuracy_by_attribute"]
        lines.append(f"| {run['label']} | " + " | ".join(f"{accuracy[a]:.0%}" for a in data["attributes"]) + " |")
    lines += [
        "",
        f"![recall per arm]({RECALL_PLOT})",
        "",
        "## Held-out loss",
        "",
        f"![held-out loss]({LOSS_PLOT})",
        "",
    ]
    if "leaf_usage" in data["plots"]:
        lines += [
            "## Leaf usage of the tree",
            "",
            "Share of held-out tokens each leaf serves, per layer (hard routing).",
            "",
            f"![leaf usage]({LEAF_PLOT})",
            "",
        ]
    return "\n".join(lines)


def plot_recall(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["arms"]
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    positions = range(len(runs))
    width = 0.38
    held = [100 * run["recall_held_out"] for run in runs]
    seen = [100 * run["recall_seen_paraphrase"] for run in runs]
    axes.bar([p - width / 2 for p in positions], held, width, label="held-out paraphrase")
    axes.bar([p + width / 2 for p in positions], seen, width, label="seen paraphrase", alpha=0.6)
    for p, value in zip(positions, held):
        axes.text(p - width / 2, value + 1, f"{value:.0f}%", ha="center", fontsize=8)
    labels = [f"{run['label']}\n{run['active_params_per_token']:,} / token" for run in runs]
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.set_ylabel("exact-match recall (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Recall of {data['facts']} synthetic facts ({data['people']} people)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def _atomic_plot(draw: Callable[[Path], Any], path: Path) -> None:
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        draw(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def layers_text(layers: list[int] | None) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if layers else "every layer"


def versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft-tree-lora": __version__,
    }
