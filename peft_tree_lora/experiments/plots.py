"""The studies' PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"full": "tab:gray", "lora": "tab:blue", "tree_token": "tab:red", "tree_sequence": "tab:orange"}


def _colour(key: str, kind: str, index: int) -> str:
    if key in COLOURS:
        return COLOURS[key]
    if kind == "lora":
        return "tab:blue" if index == 0 else "tab:green"
    return f"C{index}"


def plot_saturation(data: dict[str, Any], path: Path) -> None:
    """Held-out loss against tokens: the whole run from the start of pretraining (left) and the continuation
    only (right). With several seeds each arm is drawn as its mean with a band from min to max."""
    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    pretrain = data["pretrain"]["curve"]
    for axis in (whole, zoom):
        axis.plot([p[1] for p in pretrain], [p[2] for p in pretrain], color="black", label="pretraining")
    lora_seen = 0
    for arm in data["arms"]:
        runs = data["runs"].get(arm["key"], [])
        if not runs:
            continue
        colour = _colour(arm["key"], arm["kind"], lora_seen if arm["kind"] == "lora" else 0)
        lora_seen += arm["kind"] == "lora"
        tokens = [p[1] for p in runs[0]["curve"]]
        losses = list(zip(*[[p[2] for p in run["curve"]] for run in runs]))
        mean = [sum(values) / len(values) for values in losses]
        for axis in (whole, zoom):
            axis.plot(tokens, mean, color=colour, label=arm["label"])
            if len(runs) > 1:
                axis.fill_between(tokens, [min(v) for v in losses], [max(v) for v in losses], color=colour, alpha=0.2)
    start = data["pretrain"]["tokens"]
    whole.axvline(start, color="black", linestyle=":", linewidth=1)
    whole.set_xscale("log")
    whole.set_title("held-out loss from the start of pretraining")
    start_name = "saturation" if data["pretrain"]["plateau_reached"] else "pretraining (plateau not reached)"
    zoom.set_title(f"after {start_name}: same tokens for every arm")
    continuation = [p[2] for runs in data["runs"].values() for run in runs for p in run["curve"]]
    if continuation:
        low, high = min(continuation), max(continuation)
        margin = max(0.005, 0.1 * (high - low))
        zoom.set_ylim(low - margin, high + margin)
        zoom.set_xlim(start - 0.02 * data["continue_tokens"], start + 1.02 * data["continue_tokens"])
    for axis in (whole, zoom):
        axis.set_xlabel("training tokens")
        axis.set_ylabel("held-out loss (nats per byte)")
        axis.grid(alpha=0.3)
    zoom.legend(fontsize=8)
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
