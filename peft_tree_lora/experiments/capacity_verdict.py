"""The capacity study's summary and verdict, computed from its runs (nothing here trains)."""

from __future__ import annotations

from typing import Any

from .common import summarise_runs

# Per-arm figures summarised over seeds (mean, std, min, max) in the JSON and on the results page.
SUMMARY_METRICS = (
    "recall",
    "recall_seen_paraphrase",
    "facts_recalled",
    "bits",
    "bits_per_active_param",
    "held_out_loss",
    "recall_soft",
    "soft_minus_hard_recall",
    "soft_minus_hard_loss",
    "train_seconds",
)


def summarise(runs: list[dict[str, Any]], arm_keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric of `SUMMARY_METRICS`: mean, std, min, max and n over the seeds."""
    return summarise_runs(runs, arm_keys, SUMMARY_METRICS)


def compare_by_seed(runs: list[dict[str, Any]], key: str, other: str, metric: str = "recall") -> dict[str, Any]:
    """`key` against `other`, seed by seed: the differences, the seed spread (the larger of the two arms' max - min
    over seeds) and whether `key` is ahead on every seed by more than that spread (needs two or more seeds). Also
    the paired view, which does not count how hard a seed is as noise: the mean difference and its standard error."""
    mine = {r["seed"]: r[metric] for r in runs if r["arm"] == key}
    theirs = {r["seed"]: r[metric] for r in runs if r["arm"] == other}
    seeds = sorted(set(mine) & set(theirs))
    differences = [mine[s] - theirs[s] for s in seeds]
    spread = max(
        (max(values) - min(values) for values in ([mine[s] for s in seeds], [theirs[s] for s in seeds]) if values),
        default=0.0,
    )
    mean_difference = sum(differences) / len(differences) if differences else 0.0
    paired_se = (
        (sum((d - mean_difference) ** 2 for d in differences) / (len(differences) - 1) / len(differences)) ** 0.5
        if len(differences) >= 2
        else float("nan")
    )
    return {
        "against": other,
        "seeds": seeds,
        "differences": differences,
        "mean_difference": mean_difference,
        "paired_standard_error": paired_se,
        "spread": spread,
        "seeds_ahead": sum(d > 0 for d in differences),
        "beats": len(seeds) >= 2 and all(d > spread for d in differences),
    }


def verdict(data: dict[str, Any]) -> dict[str, Any]:
    """The study's answer: every tree variant against its own compute-matched LoRA and against its frozen-router
    control where it has one, each tree's recall as a share of LoRA r * 2**d's, the capacity check of LoRA r, and the
    gap between serving one leaf and mixing every leaf of the same trained tree."""
    runs, roles, summary = data["runs"], data["roles"], data["summary"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    trees = [a["key"] for a in data["arms"] if "tree" in a["roles"] and summary.get(a["key"])]
    mean = {key: summary[key]["recall"]["mean"] for key in summary if "recall" in summary[key]}
    seeds = len(data["settings"]["seeds"])
    default = "tree" if "tree" in trees else trees[0]
    result: dict[str, Any] = {"default_tree": default, "best_tree": max(trees, key=lambda k: mean[k])}

    def recall_text(key: str) -> str:
        s = summary[key]["recall"]
        return f"{s['mean']:.1%}" + (f" [{s['min']:.1%}, {s['max']:.1%}]" if seeds > 1 else "")

    def outcome(c: dict[str, Any]) -> str:
        return "undecided (one seed)" if seeds < 2 else ("YES" if c["beats"] else "NO")

    sentences, result["compute_matched"] = [], {}
    for key in trees:
        other = roles.get(f"compute_matched:{key}")
        if other not in mean:
            continue
        c = compare_by_seed(runs, key, other)
        result["compute_matched"][key] = c
        sentences.append(
            f"{labels[key]} ({recall_text(key)}) against its compute-matched {labels[other]} ({recall_text(other)}): "
            f"ahead on every seed by more than the seed spread ({c['spread']:.1%})? {outcome(c)} (tree minus LoRA: "
            + ", ".join(f"{d:+.1%}" for d in c["differences"])
            + f"; ahead on {c['seeds_ahead']} of {len(c['seeds'])} seeds, mean {c['mean_difference']:+.1%}"
            + (f", paired s.e. {c['paired_standard_error']:.1%}" if len(c["seeds"]) >= 2 else "")
            + ")."
        )
    result["frozen_router"] = {}
    controls = {key: roles.get(f"frozen_router:{key}") for key in trees}
    controls[default] = controls[default] or roles.get("frozen_router")  # older files name one control
    for key, control in controls.items():
        if control not in mean:
            continue
        c = compare_by_seed(runs, key, control)
        result["frozen_router"][key] = c
        sentences.append(
            f"{labels[key]} against its frozen-router control ({recall_text(control)}): ahead on every seed by "
            f"more than the spread ({c['spread']:.1%})? {outcome(c)} ("
            + ", ".join(f"{d:+.1%}" for d in c["differences"])
            + f"; mean {c['mean_difference']:+.1%}"
            + (f", paired s.e. {c['paired_standard_error']:.1%}" if len(c["seeds"]) >= 2 else "")
            + ")."
        )
    narrow, wide = roles.get("lora_r"), roles.get("lora_all_leaves")
    if wide in mean and mean[wide] > 0:
        result["share_of_wide"] = {key: mean[key] / mean[wide] for key in trees}
        sentences.append(
            f"Recall as a share of {labels[wide]}'s ({recall_text(wide)}), which has the parameters of all leaves: "
            + ", ".join(f"{labels[k]} {result['share_of_wide'][k]:.2f}x" for k in trees)
            + "."
        )
    if narrow in mean and wide in mean and narrow != wide:
        bound = mean[narrow] < 0.5 * mean[wide]
        result["lora_r_capacity_bound"] = bound
        sentences.append(
            f"Capacity check: {labels[narrow]} recalls {recall_text(narrow)}: "
            + ("capacity-bound at this N, as the comparison needs." if bound else "NOT clearly capacity-bound.")
        )
    gaps = [
        f"{labels[k]} {summary[k]['soft_minus_hard_recall']['mean']:+.1%} recall, "
        f"{summary[k]['soft_minus_hard_loss']['mean']:+.3f} loss"
        for k in [*trees, *controls.values()]
        if k in summary and "soft_minus_hard_recall" in summary[k]
    ]
    if gaps:
        sentences.append(
            "Every leaf mixed minus served with one leaf, same trained trees (for hard training the mix is not the "
            "trained function; for soft training it is): " + "; ".join(gaps) + "."
        )
    result["text"] = " ".join(sentences)
    return result
