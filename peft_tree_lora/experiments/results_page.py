"""docs/RESULTS.md, rewritten from the study JSON files after every study run. Numbers and the plain reading of them
are generated; the hand-written notes between the `notes` markers are kept from the previous page."""

from __future__ import annotations

import re
from pathlib import Path
from statistics import mean
from typing import Any

from .capacity import RESULT_FILE as CAPACITY_FILE
from .common import read_json
from .facts import RESULT_FILE as FACTS_FILE
from .results_capacity import CAPACITY_TITLE, _capacity_section
from .results_format import _count, _reproduce, _spread
from .saturation import RESULT_FILE as SATURATION_FILE

PAGE = "RESULTS.md"
NOTES_BEGIN, NOTES_END = "<!-- BEGIN notes -->", "<!-- END notes -->"


def write_results_page(folder: Path) -> Path:
    """Write `folder/RESULTS.md` from the studies found in `folder`; returns its path."""
    path = folder / PAGE
    notes = _kept_notes(path)
    saturation = read_json(folder / SATURATION_FILE)
    facts = read_json(folder / FACTS_FILE)
    capacity = read_json(folder / CAPACITY_FILE)
    parts = [
        "# Results: does a tree of LoRAs let a saturated model keep learning?",
        "",
        "This page is written by `tree-lora experiment saturation`, `tree-lora experiment facts` and `tree-lora "
        "experiment capacity` from their last runs; every number below comes from those runs, and the JSON files "
        f"beside this page (`{SATURATION_FILE}`, `{FACTS_FILE}`, `{CAPACITY_FILE}`) hold all of them, curves "
        "included. The section *Notes* at the end is written by hand and kept when the page is rewritten.",
        "",
    ]
    parts += (
        _saturation_section(saturation) if saturation else ["## Study 1: past saturation", "", "(not run yet)", ""]
    )
    parts += _facts_section(facts) if facts else ["## Study 2: knowledge capacity", "", "(not run yet)", ""]
    parts += _capacity_section(capacity) if capacity else [f"## {CAPACITY_TITLE}", "", "(not run yet)", ""]
    parts += ["## Notes", "", NOTES_BEGIN, notes, NOTES_END, ""]
    path.write_text("\n".join(parts))
    return path


def _kept_notes(path: Path) -> str:
    if not path.exists():
        return ""
    match = re.search(re.escape(NOTES_BEGIN) + r"\n?(.*?)\n?" + re.escape(NOTES_END), path.read_text(), re.S)
    return match.group(1) if match else ""


SATURATION_ROLES = {
    "full": "full training",
    "plateau_control": "control: pretraining goes on",
    "lora_r": "LoRA r",
    "compute_matched": "compute-matched to the tree",
    "lora_all_leaves": "as many params as all leaves",
    "tree": "tree (defaults)",
    "tree_token": "tree, token routing",
    "tree_sequence": "tree, sequence routing",
}


def _saturation_section(data: dict[str, Any]) -> list[str]:
    s, bases, matched = data["settings"], data["bases"], data["compute_matched"]
    seeds = s["seeds"]
    summary = data["summary"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    reached = [b for b in bases if b["plateau_reached"]]
    lines = [
        "## Study 1: past saturation",
        "",
        f"Per seed ({', '.join(map(str, seeds))}: the seed draws the model's initialisation, which training blocks "
        "pretraining may use and their order, and seeds every adapter), a Llama of "
        f"{_count(data['base_params'])} parameters (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, "
        f"SwiGLU {s['intermediate']}, byte-level vocabulary of 257, tied embeddings) is trained from scratch on the "
        f"embedded corpus ({data['corpus']}), {s['batch_size']} blocks of {s['block_length']} bytes a step, at a "
        f"constant learning rate of {s['pretrain_lr']} after {s['warmup_steps']} warm-up steps. Its pool is every "
        "training block but those the seed keeps for the continuation; when pretraining needs more steps than the "
        "pool has, it goes through the pool again in a new order. "
        "The held-out documents give two disjoint sets of blocks: **validation** "
        f"({data['validation_tokens']:,} bytes, evaluated every {s['eval_every']} steps: the curves and the plateau "
        f"criterion) and **test** ({data['test_tokens']:,} bytes: every loss in the table). The model is this "
        "small so that it can saturate within the tokens these 2-core machines train in minutes, and keeps "
        f"{s['layers']} layers for the adapters to act on. **Saturation criterion:** stop when the best "
        f"validation loss of the last {s['patience']} evaluations is not at least {s['min_improvement']:.1%} below "
        f"the best loss before them (at most {s['max_pretrain_steps']} steps).",
        "",
    ]
    if len(reached) == len(bases):
        lines.append(f"**The plateau was reached on every seed ({len(bases)} of {len(bases)}).**")
    else:
        missing = ", ".join(str(b["seed"]) for b in bases if not b["plateau_reached"])
        lines.append(
            f"**The plateau was NOT reached on {len(bases) - len(reached)} of {len(bases)} seeds (seed {missing}): "
            f"the budget of {s['max_pretrain_steps']} steps ran out while the validation loss was still falling, "
            "so on those seeds the continuation starts from a model that is still learning, not a saturated one.**"
        )
    lines += [
        "",
        f"| seed | pretraining stopped | steps | tokens (epochs of the pool) | validation loss | fall of the best "
        f"validation loss over the last {s['patience']} evaluations | test loss (the base) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in bases:
        fall = b.get("last_window_improvement")
        lines.append(
            f"| {b['seed']} | {b['stop_reason']} | {b['steps']} | {b['tokens']:,} ({b['epochs']:.2f}) "
            f"| {b['final_loss']:.4f} | {'-' if fall is None else f'{fall:.2%}'} | {b['test_loss']:.4f} |"
        )
    lines += [
        "",
        f"From its base every arm of a seed trains on the same {data['continue_tokens']:,} fresh tokens (blocks its "
        f"pretraining never drew), {s['continue_steps']} steps of AdamW with {s['warmup_steps']} warm-up steps and "
        "linear decay to zero (the control alone keeps the pretraining's constant rate), every adapter on every "
        "linear layer with lora_alpha = 2 x rank. **Learning rates:** "
        + (
            f"every arm at {s['pretrain_lr']}, the pretraining rate (not tuned per arm)."
            if s["adapter_lr"] == s["pretrain_lr"]
            else f"full training at the pretraining rate {s['pretrain_lr']}, every adapter at one rate, "
            f"{s['adapter_lr']} (not tuned per arm)."
        )
        + " **Compute-matched LoRA:** the smallest rank whose parameters per token reach the "
        f"default tree's active parameters per token (one leaf per layer plus the {s['depth']} routers on a token's "
        f"path, depth x (in + 1) per block, or per module for token routing): {matched['tree_active_per_token']:,} "
        f"-> LoRA r={matched['rank']} ({matched['rank'] * matched['per_rank']:,}); a sequence router runs once per "
        "sequence, so a token of the sequence-routed tree costs what LoRA r costs. Every model is evaluated as "
        "served (evaluation mode; a tree applies one leaf per token or sequence). **Improvement** is the base's test "
        "loss minus the arm's, per seed.",
        "",
        *_reproduce(data),
        f"![pretraining, continuation and test-loss improvement]({data.get('plot', 'saturation_loss.png')})",
        "",
        "Cells: mean [min, max] over seeds." if len(seeds) > 1 else "One seed.",
        "",
        "| arm | role | test loss after | improvement over the base | improvement per seed "
        f"({', '.join(map(str, seeds))}) | trainable params | params per token | training time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in data["arms"]:
        runs = [r for r in data["runs"] if r["arm"] == arm["key"]]
        if not runs:
            continue
        by_seed = {r["seed"]: r["improvement"] for r in runs}
        active = "all (full model)" if arm["kind"] == "full" else f"{runs[0]['active_params_per_token']:,}"
        roles = ", ".join(SATURATION_ROLES.get(role, role) for role in arm["roles"])
        lines.append(
            f"| {arm['label']} | {roles} | {_summary_cell(summary[arm['key']]['test_loss'], 4)} "
            f"| {_summary_cell(summary[arm['key']]['improvement'], 4, '+')} "
            f"| {', '.join(f'{by_seed[seed]:+.4f}' if seed in by_seed else '-' for seed in seeds)} "
            f"| {runs[0]['trainable_params']:,} | {active} "
            f"| {_summary_cell(summary[arm['key']]['train_seconds'], 0)} |"
        )
    lines += ["", "**Verdict (computed from the runs).** " + data["verdict"]["text"], ""]
    entropies = [
        f"{labels[arm['key']]} {mean(v):.2f}"
        for arm in data["arms"]
        if (
            v := [
                r["leaf_usage_entropy"]
                for r in data["runs"]
                if r["arm"] == arm["key"] and r["leaf_usage_entropy"] is not None
            ]
        )
    ]
    if entropies:
        lines += [
            "Leaf usage on the validation blocks under served routing (normalised entropy, 1 = every leaf used "
            "equally, 0 = one leaf takes all): " + ", ".join(entropies) + ".",
            "",
        ]
    return lines


def _summary_cell(figures: dict[str, Any], digits: int, sign: str = "") -> str:
    if figures["n"] == 1:
        return f"{figures['mean']:{sign}.{digits}f}"
    return f"{figures['mean']:{sign}.{digits}f} [{figures['min']:{sign}.{digits}f}, {figures['max']:{sign}.{digits}f}]"


def _facts_section(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    bases = data["bases"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    attributes = ", ".join(f"{name} ({count:,} values)" for name, count in data["attributes"].items())
    lines = [
        "## Study 2: knowledge capacity",
        "",
        f"Synthetic people (seeded generator) each have four facts: {attributes}, {data['bits_per_person']:.1f} bits "
        "per person. Every fact has four paraphrased templates; training shows three of them, and which one is held "
        "out rotates with the person, so each template is familiar from other people but never seen for this "
        "fact. A person's training statements form one short biography per epoch, in a freshly shuffled order.",
        "",
        f"Model: a tiny word-level Llama (vocabulary {data['vocab_size']}, hidden {s['hidden']}, {s['layers']} "
        f"layers, {s['heads']} heads, SwiGLU {s['intermediate']}, {_count(bases[0]['params'])} parameters), first "
        f"trained in full on the biographies of {s['background']} other people (all four templates, "
        f"{s['background_epochs']} epochs, batch {s['base_batch_size']}, learning rate {s['base_lr']}); it recalls "
        f"{_spread([b['background_recall'] for b in bases], 3)} of those background facts. Adapters (every linear "
        f"layer, lora_alpha = 2 x rank) then learn N new people for {s['epochs']} epochs at learning rate "
        f"{s['adapter_lr']}, batch {s['batch_size']}. **Recall** is exact match of greedy decoding after the "
        "held-out paraphrase's prompt (the full value and the closing full stop), with hard routing (one leaf); a "
        "sequence-routed tree picks its leaf from the prompt alone, as in `generate()`. **Bits** are a lower "
        "bound from Fano's inequality, per attribute N x (log2 V - h(e) - e log2(V - 1)) with e the error rate, "
        "so chance-level recall counts 0. The anchor: about 2 bits per parameter for fully trained language models "
        "(Allen-Zhu and Li, Physics of Language Models 3.3, 2024), measured on their own total parameters.",
        "",
        *_reproduce(data),
        f"![facts recalled and bits per parameter against N]({data.get('plot', 'facts_capacity.png')})",
        "",
        "| N | arm | held-out recall | recall, a seen paraphrase | facts recalled | bits | bits / adapter param "
        "| bits / active param | adapter params (active) | training time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for people in s["people"]:
        for arm in data["arms"]:
            runs = [r for r in data["runs"] if r["people"] == people and r["arm"] == arm["key"]]
            if not runs:
                continue

            def values(key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
                return [r[key] for r in runs]

            lines.append(
                f"| {people} | {labels[arm['key']]} | {_spread(values('recall'), 3)} "
                f"| {_spread(values('recall_seen_paraphrase'), 3)} | {_spread(values('facts_recalled'), 0)} "
                f"| {_spread(values('bits'), 0)} | {_spread(values('bits_per_adapter_param'), 3)} "
                f"| {_spread(values('bits_per_active_param'), 3)} | {_count(runs[0]['trainable_params'])} "
                f"({_count(runs[0]['active_params_per_token'])}) | {_spread(values('train_seconds'), 0)} |"
            )
    before = [r["recall_before"] for r in data["runs"]]
    chance = mean(1 / count for count in data["attributes"].values())
    lines += [
        "",
        f"Before any adapter training the base recalls at most {max(before):.1%} of the study people's facts "
        f"(uniform guessing would score {chance:.1%}).",
        "",
        *_facts_reading(data),
        "",
    ]
    return lines


def _facts_reading(data: dict[str, Any]) -> list[str]:
    labels = {a["key"]: a["label"] for a in data["arms"]}
    sizes = data["settings"]["people"]
    text = ["**What the numbers say.**"]
    best_bits: dict[str, float] = {}
    for arm in data["arms"]:
        per_size = {}
        for people in sizes:
            runs = [r for r in data["runs"] if r["people"] == people and r["arm"] == arm["key"]]
            if runs:
                per_size[people] = (
                    mean(r["facts_recalled"] for r in runs),
                    mean(r["bits_per_adapter_param"] for r in runs),
                    mean(r["bits_per_active_param"] for r in runs),
                    mean(r["recall"] for r in runs),
                )
        if not per_size:
            continue
        most = max(per_size, key=lambda n: per_size[n][0])
        best_bits[arm["key"]] = max(v[1] for v in per_size.values())
        text.append(
            f"{labels[arm['key']]} recalls at most {per_size[most][0]:.0f} facts (N={most}, held-out recall "
            f"{per_size[most][3]:.1%}), at best {best_bits[arm['key']]:.3f} bits per adapter parameter and "
            f"{max(v[2] for v in per_size.values()):.3f} bits per active parameter."
        )
    if best_bits:
        top = max(best_bits.values())
        text.append(
            f"The best adapter stores {top:.3f} bits per trained parameter, "
            + ("above" if top > 2 else f"{2 / top:.0f} times below" if top > 0 else "far below")
            + " the ~2 bits per parameter anchor."
        )
    return [" ".join(text)]
