"""The saturation study's summary and verdict, computed from its runs (nothing here trains)."""

from __future__ import annotations

import math
from typing import Any

from .common import summarise_runs

SUMMARY_METRICS = ("test_loss", "improvement", "validation_loss", "train_seconds")


def summarise(runs: list[dict[str, Any]], arm_keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric of `SUMMARY_METRICS`: mean, std, min, max and n over the seeds."""
    return summarise_runs(runs, arm_keys, SUMMARY_METRICS)


def verdict(data: dict[str, Any]) -> dict[str, Any]:
    """The study's answer, computed from the runs: the tree's improvement over the saturated base (test loss before
    minus after) against each other arm's, seed by seed. The tree "beats" an arm when it improves more on every seed
    by more than the seed spread (the larger of the two arms' max - min improvement over seeds; two or more seeds)."""
    from .capacity_verdict import compare_by_seed

    runs, roles = data["runs"], data["roles"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    seeds = len(data["settings"]["seeds"])
    bases = data["bases"]
    reached = [b["seed"] for b in bases if b["plateau_reached"]]
    result: dict[str, Any] = {"plateau_seeds": reached, "against": {}}
    if len(reached) == len(bases):
        sentences = [f"Pretraining reached the plateau on every seed ({len(bases)} of {len(bases)})."]
    else:
        missing = [b["seed"] for b in bases if not b["plateau_reached"]]
        sentences = [
            f"Pretraining did NOT reach the plateau on {len(missing)} of {len(bases)} seeds (seed"
            f"{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}: the step budget ran out first), so "
            + ("this is not a comparison after saturation." if not reached else "those seeds were still learning.")
        ]
    tree = roles.get("tree")
    if tree is None:
        result["text"] = " ".join(sentences)
        return result

    def improvement(key: str) -> str:
        s = data["summary"][key]["improvement"]
        return f"{s['mean']:+.4f}" + (f" [{s['min']:+.4f}, {s['max']:+.4f}]" if seeds > 1 else "")

    def outcome(c: dict[str, Any]) -> str:
        return "undecided (one seed)" if seeds < 2 else ("YES" if c["beats"] else "NO")

    others = []
    for role in ("compute_matched", "lora_r", "lora_all_leaves", "full"):
        other = roles.get(role)
        if other is None or other == tree or other in result["against"]:
            continue
        c = compare_by_seed(runs, tree, other, metric="improvement")
        c["role"] = role
        result["against"][other] = c
        losses = ", ".join(f"{-d:+.4f}" for d in c["differences"])
        if role == "compute_matched":
            sentences.append(
                f"Does {labels[tree]} (improvement over the base {improvement(tree)} nats per byte) beat its "
                f"compute-matched {labels[other]} ({improvement(other)}) on every seed by more than the seed spread "
                f"(the larger of the two arms' ranges of improvement over the seeds, {c['spread']:.4f})? "
                f"{outcome(c)}: lower test loss on {c['seeds_ahead']} of {len(c['seeds'])} seeds (tree minus LoRA "
                f"test loss: {losses}; a YES needs every one below -{c['spread']:.4f})."
            )
        else:
            others.append(
                f"{labels[other]} (improvement {improvement(other)}): {outcome(c)}, ahead on {c['seeds_ahead']} of "
                f"{len(c['seeds'])} (tree minus it: {losses}; spread {c['spread']:.4f})"
            )
    if others:
        sentences.append("The same question against the other arms: " + "; ".join(others) + ".")
    sequence, narrow = roles.get("tree_sequence"), roles.get("lora_r")
    if sequence is not None and narrow is not None:
        # a sequence router runs once per sequence: a token costs one leaf, what LoRA r costs
        c = compare_by_seed(runs, sequence, narrow, metric="improvement")
        result["tree_sequence_against_lora_r"] = c
        sentences.append(
            f"{labels[sequence]} ({improvement(sequence)}) against {labels[narrow]}, which costs a token as much: "
            f"{outcome(c)}, ahead on {c['seeds_ahead']} of {len(c['seeds'])} seeds."
        )
    control, full = roles.get("plateau_control"), roles.get("full")
    if control is not None:
        result["plateau_control_improvement"] = data["summary"][control]["improvement"]["mean"]
        text = (
            f"Control: pretraining simply going on for the continuation's tokens at its constant rate changes the "
            f"test loss by {-result['plateau_control_improvement']:+.4f} (improvement {improvement(control)}), "
            f"against {-data['summary'][tree]['improvement']['mean']:+.4f} for the tree"
        )
        if full is not None:
            text += (
                f" and {-data['summary'][full]['improvement']['mean']:+.4f} for full training with the decaying rate "
                "(the difference between the two full-training arms is what the decay alone buys)"
            )
        sentences.append(text + ".")
    matched = roles.get("compute_matched")
    result["tree_beats_compute_matched"] = result["against"].get(matched, {}).get("beats") if matched else None
    tree_gain = data["summary"][tree]["improvement"]["mean"]
    result["tree_keeps_lowering"] = tree_gain > 0
    sentences.append(
        f"The tree {'does' if tree_gain > 0 else 'does not'} go on lowering the test loss after the "
        f"{'plateau' if len(reached) == len(bases) else 'pretraining'} (mean change {-tree_gain:+.4f} nats per byte; "
        "every arm's continuation ends with the same decay of the learning rate to zero)."
    )
    result["text"] = " ".join(sentences)
    return result


def _stop_summary(bases: list[dict[str, Any]], budget: int) -> str:
    reached = [b for b in bases if b["plateau_reached"]]
    steps = ", ".join(f"seed {b['seed']} at step {b['steps']}" for b in reached)
    text = f"plateau reached on {len(reached)} of {len(bases)} seeds" + (f" ({steps})" if steps else "")
    if len(reached) < len(bases):
        text += f"; the others stopped at the budget of {budget} steps"
    return text


def leaf_usage_entropy(usage: dict[str, list[int]]) -> float:
    """Mean over modules of the entropy of held-out leaf usage divided by its maximum, log(leaves): 1 when every
    leaf gets the same traffic, 0 when one leaf takes everything."""
    values = []
    for counts in usage.values():
        total = sum(counts)
        if total == 0 or len(counts) < 2:
            continue
        entropy = -sum(c / total * math.log(c / total) for c in counts if c)
        values.append(entropy / math.log(len(counts)))
    return sum(values) / len(values) if values else 0.0
