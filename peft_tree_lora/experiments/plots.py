"""The studies' PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "full": "tab:gray",
    "lora": "tab:blue",
    "tree": "tab:red",
    "tree_token": "tab:purple",
    "tree_sequence": "tab:orange",
}


def _colour(key: str, kind: str, index: int) -> str:
    if key in COLOURS:
        return COLOURS[key]
    if kind == "lora":
        return "tab:blue" if index == 0 else "tab:green"
    return f"C{index}"


def plot_saturation(data: dict[str, Any], path: Path) -> None:
    """Left: validation loss of each seed's pretraining against tokens, with the step where it stopped. Middle: the
    continuation, validation loss minus the saturated base's, against tokens since the checkpoint (mean over seeds,
    band from min to max). Right: each arm's test-loss improvement over its base (bar: mean, dots: seeds), labelled
    with its adapter parameters per token."""
    figure, (whole, zoom, bars) = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [4, 4, 3]})
    greys = ("black", "dimgray", "darkgray", "silver")
    for index, base in enumerate(data["bases"]):
        colour = greys[index % len(greys)]
        curve = [p for p in base["curve"] if p[1] > 0]
        how = f"plateau at step {base['steps']}" if base["plateau_reached"] else "budget spent, no plateau"
        whole.plot([p[1] for p in curve], [p[2] for p in curve], color=colour, label=f"seed {base['seed']}: {how}")
        whole.axvline(base["tokens"], color=colour, linestyle=":", linewidth=1)
    whole.set_xscale("log")
    whole.set_xlabel("pretraining tokens")
    whole.set_ylabel("validation loss (nats per byte)")
    whole.set_title("pretraining until the plateau criterion")
    whole.legend(fontsize=8)
    lora_seen = 0
    labels = []
    for index, arm in enumerate(data["arms"]):
        runs = [r for r in data["runs"] if r["arm"] == arm["key"]]
        if not runs:
            continue
        if arm["kind"] == "lora":
            colour = ("tab:blue", "tab:green", "tab:cyan")[min(lora_seen, 2)]
            lora_seen += 1
        else:
            colour = _colour(arm["key"], arm["kind"], index)
        if arm["key"] == "tree":
            colour = "tab:red"
        elif "plateau_control" in arm.get("roles", []):
            colour = "black"
        tokens = [p[1] for p in runs[0]["curve"]]
        changes = list(zip(*[[p[2] - run["curve"][0][2] for p in run["curve"]] for run in runs]))
        zoom.plot(tokens, [sum(v) / len(v) for v in changes], color=colour, label=arm["label"])
        if len(runs) > 1:
            zoom.fill_between(tokens, [min(v) for v in changes], [max(v) for v in changes], color=colour, alpha=0.15)
        gains = [r["improvement"] for r in runs]
        position = len(labels)
        bars.bar(position, sum(gains) / len(gains), color=colour, alpha=0.8)
        bars.scatter([position] * len(gains), gains, color="black", s=12, zorder=3)
        per_token = "all" if arm["kind"] == "full" else f"{runs[0]['active_params_per_token']:,}"
        bars.annotate(
            per_token, (position, max(gains)), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7
        )
        name = arm["label"].replace("TreeLoRA ", "tree ").replace(", token routing", "")
        if "plateau_control" in arm.get("roles", []):
            name = "control: pretraining\ngoes on (constant rate)"
        if "compute_matched" in arm.get("roles", []):
            name += "\n(compute-matched)"
        labels.append(name)
    zoom.axhline(0.0, color="black", linewidth=1)
    zoom.set_xlabel("tokens since the end of pretraining (the same for every arm)")
    zoom.set_ylabel("validation loss minus the base's")
    zoom.set_title("continuation: mean over seeds, band min-max")
    zoom.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    bars.set_xticks(range(len(labels)))
    bars.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("test loss of the base minus after (nats per byte)")
    bars.set_title("test-loss improvement (label: params per token)")
    for axis in (whole, zoom, bars):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_facts(data: dict[str, Any], path: Path) -> None:
    """Facts stored (held-out paraphrase recall x N) and bits per adapter parameter, against N, one line per
    adapter, mean over seeds with a min-max band."""
    figure, (stored, bits) = plt.subplots(1, 2, figsize=(13, 4.8))
    sizes = data["settings"]["people"]
    lora_seen = 0
    for arm in data["arms"]:
        colour = _colour(arm["key"], arm["kind"], lora_seen if arm["kind"] == "lora" else 0)
        lora_seen += arm["kind"] == "lora"
        for axis, metric in ((stored, "facts_recalled"), (bits, "bits_per_adapter_param")):
            series = [[r[metric] for r in data["runs"] if r["arm"] == arm["key"] and r["people"] == n] for n in sizes]
            present = [(n, values) for n, values in zip(sizes, series) if values]
            if not present:
                continue
            xs = [n for n, _ in present]
            axis.plot(xs, [sum(v) / len(v) for _, v in present], marker="o", color=colour, label=arm["label"])
            if any(len(v) > 1 for _, v in present):
                low, high = [min(v) for _, v in present], [max(v) for _, v in present]
                axis.fill_between(xs, low, high, color=colour, alpha=0.2)
    total_facts = [n * len(data["attributes"]) for n in sizes]
    stored.plot(sizes, total_facts, color="black", linestyle=":", label="all facts")
    bits.axhline(2.0, color="black", linestyle=":", label="~2 bits/param (Allen-Zhu & Li 2024)")
    for axis in (stored, bits):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("people N (4 facts each)")
        axis.grid(alpha=0.3)
    stored.set_yscale("log")
    bits.set_yscale("symlog", linthresh=1e-3)  # from zero through thousandths up to the 2 bits/param anchor
    bits.set_ylim(0, 4)
    stored.set_ylabel("facts recalled from held-out paraphrases")
    bits.set_ylabel("bits of knowledge per adapter parameter")
    stored.legend(fontsize=8)
    bits.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_capacity(data: dict[str, Any], path: Path) -> None:
    """Left: served held-out recall per arm (bar: mean over seeds, whiskers: min to max, dots: seeds; open diamonds:
    the same trees with soft routing), each bar labelled with its active adapter parameters per token. Right: recall
    against active parameters per token."""
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(14, 6.4), gridspec_kw={"width_ratios": [3, 2]})
    lora_seen = 0
    tree_seen = 0
    for index, arm in enumerate(data["arms"]):
        runs = [r for r in data["runs"] if r["arm"] == arm["key"]]
        if not runs:
            continue
        if arm["kind"] == "lora":
            colour = ("tab:blue", "tab:green", "tab:cyan", "navy", "teal")[min(lora_seen, 4)]
            lora_seen += 1
        elif any(role.startswith("frozen_router") for role in arm.get("roles", [])):
            colour = "tab:gray"
        else:
            colour = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")[tree_seen % 6]
            tree_seen += 1
        recall = [r["recall"] for r in runs]
        mean = sum(recall) / len(recall)
        active = runs[0]["active_params_per_token"]
        bars.bar(index, mean, color=colour, alpha=0.8)
        if len(recall) > 1:
            bars.errorbar(index, mean, yerr=[[mean - min(recall)], [max(recall) - mean]], color="black", capsize=4)
        bars.scatter([index] * len(recall), recall, color="black", s=12, zorder=3)
        soft = [r["recall_soft"] for r in runs if r.get("recall_soft") is not None]
        if soft:
            bars.scatter([index + 0.25] * len(soft), soft, marker="D", facecolors="none", edgecolors=colour, zorder=3)
        bars.annotate(
            f"{active:,}\nper token",
            (index, max(recall)),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
        scatter.errorbar(
            active,
            mean,
            yerr=[[mean - min(recall)], [max(recall) - mean]],
            fmt="o",
            color=colour,
            capsize=3,
            label=_short_label(arm),
        )
    bars.set_xticks(range(len(data["arms"])))
    bars.set_xticklabels([_short_label(a) for a in data["arms"]], rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("held-out-paraphrase recall (served: one leaf)")
    bars.set_ylim(0, 1.25)  # room above the tallest bar's label for the legend
    bars.scatter([], [], marker="D", facecolors="none", edgecolors="black", label="same tree, soft routing")
    bars.scatter([], [], color="black", s=12, label="one seed")
    bars.legend(fontsize=8, loc="upper left", ncol=2)
    seeds = len(data["settings"]["seeds"])
    bars.set_title(f"N={data['settings']['people']} people, {seeds} seed{'s' * (seeds > 1)}: mean, min-max, seeds")
    scatter.set_xscale("log")
    scatter.set_xlabel("adapter parameters active per token (routers included)")
    scatter.set_ylabel("held-out-paraphrase recall")
    scatter.set_ylim(0, 1.05)
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    for axis in (bars, scatter):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")  # the legend below the scatter stays inside the image
    plt.close(figure)


def _short_label(arm: dict[str, Any]) -> str:
    label = re.sub(r"TreeLoRA d=\d+ r=\d+, ", "tree: ", arm["label"])
    label = label.replace("hard training", "hard").replace("the learning rate", "LR").replace(" (the defaults)", "")
    if any(role.startswith("compute_matched") for role in arm.get("roles", [])):
        label += " (compute-matched)"
    return label
