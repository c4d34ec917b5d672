"""The capacity study's section of RESULTS.md, built from `capacity.json`."""

from __future__ import annotations

from statistics import mean
from typing import Any

from .results_format import _count, _reproduce, _spread

CAPACITY_TITLE = "Study 3: capacity at matched compute"


ROLE_NAMES = {
    "lora_r": "LoRA r",
    "lora_all_leaves": "as many params as all leaves",
    "tree": "tree variant",
    "frozen_router": "control: routers frozen",
}


def _capacity_section(data: dict[str, Any]) -> list[str]:
    s, bases, matched = data["settings"], data["bases"], data["compute_matched"]
    summary = data["summary"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    seeds = s["seeds"]
    planned = [v["key"] for v in data["tree_variants"] if v["key"] not in s["tree_arms"]]
    lines = [
        f"## {CAPACITY_TITLE}",
        "",
        f"The facts study's set-up at one size, N={s['people']} people ({4 * s['people']} facts), over "
        f"{len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))}; a seed draws the background and "
        "study people, trains its own base and seeds every adapter). Base per seed: the word-level Llama (hidden "
        f"{s['hidden']}, {s['layers']} layers, {s['heads']} heads, SwiGLU {s['intermediate']}, "
        f"{_count(bases[0]['params'])} parameters) trained in full on {s['background']} background people for "
        f"{s['background_epochs']} epochs; it recalls {_spread([b['background_recall'] for b in bases], 3)} of "
        f"their facts and {_spread([b['recall_before'] for b in bases], 3)} of the study people's. Every arm then "
        f"trains from that base for {s['epochs']} epochs with the same optimiser (AdamW, linear decay), batch "
        f"{s['batch_size']} and steps, on every linear layer with lora_alpha = 2 x rank. **Learning rates, one rule "
        f"for every arm:** each arm trains at every rate of {s['lr_grid']} on the people of validation seed "
        f"{s['validation_seed']} (not test people) and keeps the rate with the best held-out recall there: "
        + ", ".join(f"{labels[k]} {lr}" for k, lr in data.get("learning_rates", {}).items())
        + ".",
        "",
        "**Compute-matched LoRA.** Each tree variant is compared with the smallest LoRA whose parameters per token "
        "are at least the tree's active parameters per token (one leaf per layer plus the routers a token runs: "
        "depth x (in + 1) per module for token routing, per block for block routing; a sequence router runs once "
        "per sequence): "
        + "; ".join(
            f"{labels[k]} {m['tree_active_per_token']:,} -> LoRA r={m['rank']} ({m['rank'] * m['per_rank']:,})"
            for k, m in matched.items()
        )
        + ". A frozen-router control is a tree variant with every router parameter frozen at its random "
        "initialisation (same rank, depth, routing and learning-rate rule), so that it keeps the leaves and "
        "loses only learnt routes. **Served** figures are the model in evaluation mode with the adapter's own "
        "inference routing (one leaf per token or sequence); the **mixed** columns evaluate the same trained tree "
        "with every leaf mixed by its path probability (what soft training trains; for hard training a different "
        "function)." + (f" Tree variants defined but not run: {', '.join(planned)}." if planned else ""),
        "",
        *_reproduce(data),
        f"![held-out recall per arm and against active parameters per token]({data.get('plot', 'capacity.png')})",
        "",
        "Cells: mean [min, max] over seeds." if len(seeds) > 1 else "One seed.",
        "",
        "| arm | role | held-out recall | recall, a seen paraphrase | facts recalled | bits | bits / active param "
        "| trainable adapter params (active per token) | held-out loss | mixed - served recall | mixed - served loss "
        "| training time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in data["arms"]:
        figures = summary.get(arm["key"], {})
        runs = [r for r in data["runs"] if r["arm"] == arm["key"]]
        if not runs:
            continue

        def cell(metric: str, digits: int, figures: dict[str, Any] = figures) -> str:
            f = figures.get(metric)
            if f is None:
                return "-"
            if f["n"] == 1:
                return f"{f['mean']:.{digits}f}"
            return f"{f['mean']:.{digits}f} [{f['min']:.{digits}f}, {f['max']:.{digits}f}]"

        roles = ", ".join(
            f"compute-matched to {role.split(':', 1)[1]}"
            if role.startswith("compute_matched:")
            else f"control: {role.split(':', 1)[1]} with routers frozen"
            if role.startswith("frozen_router:")
            else ROLE_NAMES[role]
            for role in arm["roles"]
        )
        lines.append(
            f"| {arm['label']} | {roles} | {cell('recall', 3)} | {cell('recall_seen_paraphrase', 3)} "
            f"| {cell('facts_recalled', 0)} | {cell('bits', 0)} | {cell('bits_per_active_param', 4)} "
            f"| {_count(runs[0]['trainable_params'])} ({_count(runs[0]['active_params_per_token'])}) "
            f"| {cell('held_out_loss', 3)} | {cell('soft_minus_hard_recall', 3)} | {cell('soft_minus_hard_loss', 3)} "
            f"| {cell('train_seconds', 0)} |"
        )
    entropies = [
        f"{arm['label']} {mean(v):.2f}"
        for arm in data["arms"]
        if (
            v := [
                r["leaf_usage_entropy"]
                for r in data["runs"]
                if r["arm"] == arm["key"] and r["leaf_usage_entropy"] is not None
            ]
        )
    ]
    lines += ["", "**Verdict (computed from the runs).** " + data["verdict"]["text"], ""]
    if entropies:
        lines += [
            "Leaf usage on the held-out paraphrases under served routing (normalised entropy, 1 = every leaf used "
            "equally, 0 = one leaf takes all): " + ", ".join(entropies) + ".",
            "",
        ]
    return lines
