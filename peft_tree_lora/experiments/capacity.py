"""Study 3: capacity at matched compute. Does a tree of LoRA leaves store more facts than one LoRA that costs a token
as much? The facts study's synthetic people and pretrained word-level base, one people count N at which LoRA r is
capacity-bound, and per seed the same optimiser, steps, learning rate and batch for every arm:

- LoRA r (the tree's rank), the **compute-matched LoRA** (the smallest rank whose parameters per token reach the
  tree's active parameters per token, routers included; computed from the tree model, not written down), and LoRA
  r * 2**d (as many parameters as all the leaves);
- the tree variants of `TREE_VARIANTS` chosen by `--tree-arms`, and a **frozen-router control**: the default tree
  with its routers left at their random initialisation.

Each trained model is scored as served (evaluation mode, the adapter's configured inference routing: one leaf) on
held-out-paraphrase recall, recall of a seen paraphrase, facts stored, bits (Fano) and bits per active parameter,
and every tree again with soft inference routing, whose difference from the served figures is the hard-vs-soft gap.
A verdict line says whether the best tree variant beats the compute-matched LoRA on every seed by more than the seed
spread, and whether it beats the frozen-router control."""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import set_seed
from transformers.pytorch_utils import Conv1D

from ..errors import TreeLoraUsageError
from ..runner import leaf_usage, run_training
from .common import DOCS_DIR, Arm, command_line, versions, write_json
from .facts import (
    FIRST_NAMES,
    LAST_NAMES,
    WordTokenizer,
    document_blocks,
    exact_match,
    facts_model,
    held_out_blocks,
    pretrain_base,
    recall_queries,
    recall_scores,
    soft_inference,
    train_settings,
)
from .saturation import leaf_usage_entropy

RESULT_FILE = "capacity.json"
PLOT_FILE = "capacity.png"

# The tree arms: (key, label, TreeLoraConfig arguments on top of the default tree: depth d, rank r, lora_alpha 2 r,
# every linear layer, token routing, soft training, hard inference). A new variant is one more line.
TREE_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("tree_token", "token routing, soft training", {}),
    ("tree_sequence", "sequence routing, soft training", {"routing": "sequence"}),
    # These use TreeLoraConfig fields that are planned but not in every version (training_routing, routing="block",
    # path_lora); a version without them rejects the arm, and asking for it stops the study before any training.
    ("tree_hard", "token routing, hard (straight-through) training", {"training_routing": "hard"}),
    ("tree_switch", "token routing, switch training", {"training_routing": "switch"}),
    ("tree_block", "block routing, soft training", {"routing": "block"}),
    ("tree_path", "token routing, path LoRA, soft training", {"path_lora": True}),
    ("tree_hard_path", "token routing, path LoRA, hard training", {"training_routing": "hard", "path_lora": True}),
]
DEFAULT_TREE_ARMS = ("tree_token", "tree_sequence")  # what TreeLoraConfig accepts today
FROZEN_ROUTER_KEY = "tree_frozen_router"
ROUTER_PARAMETER = "treelora_router"  # in the name of every router parameter (token and sequence routers)

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


@dataclass
class CapacitySettings:
    """Defaults sized to finish within 20 minutes on 2 CPU cores.

    Measured with today's code and `--threads 1` at the defaults (N=64 people, 60 epochs: 240 steps of 16
    biographies of ~100 words). On an idle 2-core machine: base pretraining 42-45 s per seed (250 steps), each LoRA
    20 s of training whatever its rank, the token-routed tree 32 s (soft training runs all 8 leaves), the
    sequence-routed tree 22 s. A one-seed run of the default arms (3 LoRAs, 2 tree variants, the frozen-router
    control) while the machine also ran other work (load 1.2-1.9): base 51 s, LoRA r=1, 3, 8 24-27 s, token tree 39 s,
    sequence tree 32 s, frozen-router control 42 s, 247 s wall in all (evaluations about 7 s). Three seeds are then
    about 12.5 min, leaving room for two planned tree variants (about 40 s each per seed) within 20 minutes. The
    default three-seed run took 15.0 min while another job kept the second core busy (load average 2 to 5): base
    47-96 s, LoRAs 23-51 s, token tree 46 s, sequence tree 28-36 s, frozen-router control 39-65 s. In the one-seed
    run LoRA r=1 recalled 6 % of the held-out facts, LoRA r=3 32 % and LoRA r=8 79 %: at N=64 the narrow LoRA is
    capacity-bound and the wide one is not. (At N=32, half the time, the facts study measured LoRA r=1 at 13-17 %
    and LoRA r=8 at 82-87 %; at N=128, twice the time, LoRA r=8 fell to 52-67 %.)

    The model is the facts study's word-level Llama (hidden 64, 4 layers, 4 heads, SwiGLU 176, tied embeddings,
    about 0.23 M parameters), pretrained in full on `background` other people per seed; every arm of a seed starts
    from that seed's base."""

    people: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tree_arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_TREE_ARMS),
        metadata={
            "choices": [key for key, _, _ in TREE_VARIANTS],
            "help": f"tree variants, of {', '.join(key for key, _, _ in TREE_VARIANTS)}; ",
        },
    )
    frozen_router: bool = True
    rank: int = 1
    depth: int = 3
    epochs: int = 60
    batch_size: int = 16
    adapter_lr: float = 1e-2
    background: int = 200
    background_epochs: int = 40
    base_batch_size: int = 32
    base_lr: float = 5e-3
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 176

    def validate(self) -> None:
        for name in (
            "people",
            "epochs",
            "batch_size",
            "background",
            "background_epochs",
            "base_batch_size",
            "hidden",
            "layers",
            "heads",
            "intermediate",
        ):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise TreeLoraUsageError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}).")
        if self.rank < 1 or not 1 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 1..10; got {self.rank}, {self.depth}.")
        for name in ("adapter_lr", "base_lr"):
            if not 0 < getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be in (0, 1); got {getattr(self, name)}.")
        capacity = len(FIRST_NAMES) * len(LAST_NAMES)
        if self.background + self.people > capacity:
            raise TreeLoraUsageError(
                f"background + people must stay within the {capacity} distinct names; got "
                f"{self.background} + {self.people}."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TreeLoraUsageError(f"--seeds needs one or more distinct seeds; got {self.seeds}.")
        known = [key for key, _, _ in TREE_VARIANTS]
        unknown = [key for key in self.tree_arms if key not in known]
        if not self.tree_arms or unknown or len(set(self.tree_arms)) != len(self.tree_arms):
            raise TreeLoraUsageError(
                f"--tree-arms needs one or more distinct names from {known}; got {self.tree_arms}."
            )


@dataclass(frozen=True)
class StudyArm:
    """An arm of the study: its adapter (`arm`), its roles (`lora_r`, `compute_matched`, `lora_all_leaves`, `tree`,
    `frozen_router`) and, for the control, whether its routers are frozen after the adapter is attached."""

    arm: Arm
    roles: tuple[str, ...]
    freeze_router: bool = False

    @property
    def key(self) -> str:
        return self.arm.key


def tree_arm(key: str, settings: CapacitySettings) -> Arm:
    """The `Arm` of a tree variant of `TREE_VARIANTS`."""
    label, options = next((label, options) for k, label, options in TREE_VARIANTS if k == key)
    return Arm(
        key,
        f"TreeLoRA d={settings.depth} r={settings.rank}, {label}",
        "tree",
        settings.rank,
        settings.depth,
        options=tuple(options.items()),
    )


def checked_config(arm: Arm) -> PeftConfig:
    """The arm's adapter config; a tree arm whose arguments TreeLoraConfig rejects stops the study with a message
    that names the arm and the arguments."""
    try:
        return arm.adapter_config()
    except (TypeError, ValueError) as error:
        options = ", ".join(f"{name}={value!r}" for name, value in arm.options) or "no extra arguments"
        raise TreeLoraUsageError(
            f"tree arm {arm.key!r} ({arm.label}) asks TreeLoraConfig for {options}, which this version of "
            f"peft_tree_lora rejects: {str(error).rstrip('.')}. Leave it out of --tree-arms (today's defaults: "
            f"{' '.join(DEFAULT_TREE_ARMS)})."
        ) from None


def lora_params_per_rank(model: torch.nn.Module) -> int:
    """What one rank of LoRA costs on the layers `model`'s adapter adapts: in + out features, summed over every
    adapted Linear (or Conv1D) layer."""
    total = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        if isinstance(base, torch.nn.Linear):
            total += base.in_features + base.out_features
        elif isinstance(base, Conv1D):
            total += sum(base.weight.shape)
    return total


def compute_matched_rank(tree_model: torch.nn.Module) -> dict[str, int]:
    """The smallest LoRA rank k with k x (in + out), summed over the tree's adapted layers, at least the tree's
    active parameters per token (one leaf per layer plus, for token routing, the `depth` routers on its path)."""
    active = tree_model.base_model.parameter_counts()["active_per_token"]
    per_rank = lora_params_per_rank(tree_model)
    if per_rank == 0:
        raise TreeLoraUsageError("the tree model has no adapted Linear layers to match a LoRA to.")
    return {"rank": max(1, math.ceil(active / per_rank)), "tree_active_per_token": active, "per_rank": per_rank}


def study_arms(settings: CapacitySettings, matched_rank: int) -> list[StudyArm]:
    """LoRA r, the compute-matched LoRA and LoRA r * 2**d (one arm per distinct rank, holding every role that rank
    plays), the chosen tree variants, then the frozen-router control."""
    lora_roles: dict[int, list[str]] = {}
    for role, rank in (
        ("lora_r", settings.rank),
        ("compute_matched", matched_rank),
        ("lora_all_leaves", settings.rank * 2**settings.depth),
    ):
        lora_roles.setdefault(rank, []).append(role)
    arms = [
        StudyArm(Arm(f"lora{rank}", f"LoRA r={rank}", "lora", rank=rank), tuple(roles))
        for rank, roles in sorted(lora_roles.items())
    ]
    arms += [StudyArm(tree_arm(key, settings), ("tree",)) for key in settings.tree_arms]
    if settings.frozen_router:
        default = tree_arm(TREE_VARIANTS[0][0], settings)
        control = Arm(
            FROZEN_ROUTER_KEY,
            f"{default.label}, routers frozen at init",
            "tree",
            default.rank,
            default.depth,
            options=default.options,
        )
        arms.append(StudyArm(control, ("frozen_router",), freeze_router=True))
    return arms


class FrozenRouterFactory:
    """Builds the control for `run_training` (which takes a model factory and then no adapter config): the base from
    `factory`, the tree attached after seeding as the runner does, then every router parameter frozen. It keeps the
    routers' initial values to check afterwards that training left them alone."""

    def __init__(self, factory: Callable[[], torch.nn.Module], config: PeftConfig, seed: int) -> None:
        self.factory, self.config, self.seed = factory, config, seed
        self.initial: dict[str, torch.Tensor] = {}

    def __call__(self) -> torch.nn.Module:
        model = self.factory()
        set_seed(self.seed)
        model = get_peft_model(model, self.config)
        self.initial = {}
        for name, parameter in model.named_parameters():
            if ROUTER_PARAMETER in name:
                parameter.requires_grad_(False)
                self.initial[name] = parameter.detach().clone()
        if not self.initial:
            raise RuntimeError(f"no parameter named '*{ROUTER_PARAMETER}*' to freeze in the tree model.")
        return model

    def routers_unchanged(self, model: torch.nn.Module) -> bool:
        current = dict(model.named_parameters())
        return all(torch.equal(current[name].detach(), value) for name, value in self.initial.items())


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss on `blocks` in evaluation mode (the model's current inference routing), weighted by
    block like the runner's evaluation."""
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    return total / blocks.shape[0]


def run_capacity(settings: CapacitySettings, out_dir: Path = DOCS_DIR, show_progress: bool = True) -> dict:
    """Run the whole study, write `capacity.json` and `capacity.png` into `out_dir`, and return the result dict."""
    settings.validate()
    started = time.perf_counter()
    tokenizer = WordTokenizer()
    eos = tokenizer.eos_token_id

    # Every tree arm's config is built before any training, so that an arm this version rejects stops the study now.
    default_tree = tree_arm(TREE_VARIANTS[0][0], settings)
    for key in settings.tree_arms:
        checked_config(tree_arm(key, settings))
    probe = get_peft_model(
        facts_model(settings, tokenizer.vocab_size, 128, settings.seeds[0], None), checked_config(default_tree)
    )
    matched = compute_matched_rank(probe)
    del probe
    arms = study_arms(settings, matched["rank"])
    _say(
        f"the default tree touches {matched['tree_active_per_token']:,} adapter parameters per token; LoRA costs "
        f"{matched['per_rank']:,} per rank, so the compute-matched LoRA has r={matched['rank']}",
        show_progress,
    )

    runs: list[dict[str, Any]] = []
    bases: list[dict[str, Any]] = []
    for seed in settings.seeds:
        base = pretrain_base(
            settings, tokenizer, seed, settings.people, show_progress, lambda m: _say(m, show_progress)
        )
        people = base.study_people
        queries = recall_queries(tokenizer, people)
        before = exact_match(base.model, queries, eos)
        bases.append({**base.info, "recall_before": sum(before) / len(before)})
        base.model = None
        train_blocks = document_blocks(tokenizer, people, settings.epochs, seed, include_held_out=False)
        eval_blocks = held_out_blocks(tokenizer, people[:64])
        steps = max(1, train_blocks.shape[0] // settings.batch_size)
        base_factory = functools.partial(
            facts_model, settings, tokenizer.vocab_size, base.model_length, seed, base.state
        )
        for study_arm in arms:
            arm = study_arm.arm
            _say(f"seed {seed}: N={settings.people}, {arm.label}", show_progress)
            config = checked_config(arm)
            frozen = FrozenRouterFactory(base_factory, config, seed) if study_arm.freeze_router else None
            result = run_training(
                arm.key,
                frozen or base_factory,
                train_blocks,
                eval_blocks,
                train_settings(settings, steps, settings.adapter_lr, seed, show_progress),
                adapter_config=None if frozen else config,
            )
            if "compute_matched" in study_arm.roles and result.trainable_params != arm.rank * matched["per_rank"]:
                raise RuntimeError(
                    f"LoRA r={arm.rank} trains {result.trainable_params:,} parameters, not {arm.rank} x "
                    f"{matched['per_rank']:,}: it adapts other layers than the tree, so the ranks are not matched."
                )
            runs.append(_score(result, arm, seed, tokenizer, people, queries, eval_blocks, frozen))
            _say(_progress_line(runs[-1]), show_progress)
            result.model = None

    data = {
        "study": "capacity",
        "command": command_line(),
        "versions": versions(),
        "settings": asdict(settings),
        "vocab_size": tokenizer.vocab_size,
        "compute_matched": matched,
        "tree_variants": [
            {"key": key, "label": label, "options": options, "default": key in DEFAULT_TREE_ARMS}
            for key, label, options in TREE_VARIANTS
        ],
        "bases": bases,
        "arms": [
            {
                "key": a.key,
                "label": a.arm.label,
                "kind": a.arm.kind,
                "rank": a.arm.rank,
                "depth": a.arm.depth,
                "options": dict(a.arm.options),
                "roles": list(a.roles),
            }
            for a in arms
        ],
        "roles": {role: a.key for a in arms for role in a.roles if role != "tree"},
        "runs": runs,
    }
    data["summary"] = summarise(data["runs"], [a.key for a in arms])
    data["verdict"] = verdict(data)
    data["wall_seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_capacity

    plot_capacity(data, out_dir / PLOT_FILE)
    data["plot"] = PLOT_FILE
    write_json(out_dir / RESULT_FILE, data)
    return data


def _score(
    result: Any,
    arm: Arm,
    seed: int,
    tokenizer: WordTokenizer,
    people: list,
    queries: list,
    eval_blocks: torch.Tensor,
    frozen: FrozenRouterFactory | None,
) -> dict[str, Any]:
    """One run's figures: the served model first, then (trees) the same model with soft inference routing."""
    model = result.model
    scores = recall_scores(model, tokenizer, people, queries)
    # Leaf usage is counted here, after the recall queries, not taken from the runner: when the held-out blocks are
    # one evaluation batch, the runner's counting pass repeats the Trainer's last evaluation input exactly, which
    # the routing context takes for a continuation of that batch, so a sequence router records nothing.
    usage = leaf_usage(model, eval_blocks, 64) if arm.kind == "tree" else None
    loss = held_out_loss(model, eval_blocks)
    run = {
        "seed": seed,
        "arm": arm.key,
        **scores,
        "bits_per_active_param": scores["bits"] / result.active_params_per_token,
        "bits_per_adapter_param": scores["bits"] / result.trainable_params,
        "held_out_loss": loss,
        "trainable_params": result.trainable_params,
        "active_params_per_token": result.active_params_per_token,
        "recall_soft": None,
        "held_out_loss_soft": None,
        "soft_minus_hard_recall": None,
        "soft_minus_hard_loss": None,
        "leaf_usage_entropy": None,
        "train_seconds": result.train_seconds,
        "steps": result.steps_done,
    }
    if arm.kind == "tree":
        soft = exact_match(model, queries, tokenizer.eos_token_id, soft=True)
        with soft_inference(model):
            soft_loss = held_out_loss(model, eval_blocks)
        run["recall_soft"] = sum(soft) / len(soft)
        run["held_out_loss_soft"] = soft_loss
        run["soft_minus_hard_recall"] = run["recall_soft"] - run["recall"]
        run["soft_minus_hard_loss"] = soft_loss - loss
        run["leaf_usage_entropy"] = leaf_usage_entropy(usage) if usage else None
    if frozen is not None:
        run["routers_unchanged"] = frozen.routers_unchanged(model)
    return run


def _progress_line(run: dict[str, Any]) -> str:
    line = (
        f"  held-out recall {run['recall']:.1%} (seen paraphrase {run['recall_seen_paraphrase']:.1%}), "
        f"{run['bits']:.0f} bits, {run['bits_per_active_param']:.3f} bits/active param, "
        f"{run['train_seconds']:.0f} s"
    )
    if run["recall_soft"] is not None:
        line += f"; soft routing: recall {run['recall_soft']:.1%}, loss {run['soft_minus_hard_loss']:+.3f}"
    return line


def summarise(runs: list[dict[str, Any]], arm_keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric of `SUMMARY_METRICS`: mean, std (sample; 0 for one seed), min and max over the seeds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in arm_keys:
        arm_runs = [r for r in runs if r["arm"] == key]
        summary[key] = {}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in arm_runs if r.get(metric) is not None]
            if values:
                summary[key][metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
    return summary


def compare_by_seed(runs: list[dict[str, Any]], key: str, other: str, metric: str = "recall") -> dict[str, Any]:
    """`key` against `other`, seed by seed: the differences, the seed spread (the larger of the two arms' max - min
    over seeds) and whether `key` is ahead on every seed by more than that spread (needs two or more seeds)."""
    mine = {r["seed"]: r[metric] for r in runs if r["arm"] == key}
    theirs = {r["seed"]: r[metric] for r in runs if r["arm"] == other}
    seeds = sorted(set(mine) & set(theirs))
    differences = [mine[s] - theirs[s] for s in seeds]
    spread = max(
        (max(values) - min(values) for values in ([mine[s] for s in seeds], [theirs[s] for s in seeds]) if values),
        default=0.0,
    )
    return {
        "against": other,
        "seeds": seeds,
        "differences": differences,
        "spread": spread,
        "seeds_ahead": sum(d > 0 for d in differences),
        "beats": len(seeds) >= 2 and all(d > spread for d in differences),
    }


def verdict(data: dict[str, Any]) -> dict[str, Any]:
    """The study's answer, computed from the runs: the best tree variant (highest mean served held-out recall)
    against the compute-matched LoRA and against the frozen-router control, plus a check that LoRA r was
    capacity-bound at all."""
    runs, roles, summary = data["runs"], data["roles"], data["summary"]
    labels = {a["key"]: a["label"] for a in data["arms"]}
    trees = [a["key"] for a in data["arms"] if "tree" in a["roles"] and summary[a["key"]]]
    mean = {key: summary[key]["recall"]["mean"] for key in summary if "recall" in summary[key]}
    best = max(trees, key=lambda k: mean[k])
    result: dict[str, Any] = {"best_tree": best}
    seeds = len(data["settings"]["seeds"])

    def recall_text(key: str) -> str:
        s = summary[key]["recall"]
        return f"{s['mean']:.1%}" + (f" [{s['min']:.1%}, {s['max']:.1%}]" if seeds > 1 else "")

    sentences = [f"The best tree variant is {labels[best]} (held-out recall {recall_text(best)})."]
    for role, name in (("compute_matched", "the compute-matched"), ("frozen_router", "the frozen-router control")):
        other = roles.get(role)
        if other is None or other not in mean:
            continue
        c = compare_by_seed(runs, best, other)
        result[role] = c
        if seeds < 2:
            outcome = "undecided (one seed, so no seed spread to compare with)"
        else:
            outcome = "YES" if c["beats"] else "NO"
        differences = ", ".join(f"{d:+.1%}" for d in c["differences"])
        sentences.append(
            f"Does it beat {name} {labels[other]} ({recall_text(other)}) on every seed by more than the seed spread "
            f"({c['spread']:.1%})? {outcome}: ahead on {c['seeds_ahead']} of {len(c['seeds'])} seeds (tree minus "
            f"{'LoRA' if role == 'compute_matched' else 'control'}: {differences})."
        )
    narrow, wide = roles.get("lora_r"), roles.get("lora_all_leaves")
    if narrow in mean and wide in mean and narrow != wide:
        bound = mean[narrow] < 0.5 * mean[wide]
        result["lora_r_capacity_bound"] = bound
        sentences.append(
            f"Capacity check: {labels[narrow]} recalls {recall_text(narrow)}, {labels[wide]} {recall_text(wide)}; "
            + (
                "the narrow LoRA is capacity-bound at this N, as the comparison needs."
                if bound
                else "the narrow LoRA is NOT clearly capacity-bound at this N (the study assumes under half the wide "
                "LoRA's recall), so the comparison says little about capacity."
            )
        )
    soft = summary[best].get("recall_soft")
    if soft is not None:
        served = summary[best]["recall"]["mean"]
        sentences.append(
            f"Served with one leaf, {labels[best]} recalls {served:.1%}; the same trained tree with every leaf mixed "
            f"(soft routing, the compute of all {2 ** data['settings']['depth']} leaves) recalls {soft['mean']:.1%}"
            + (
                ", so serving one leaf loses most of what training stored."
                if soft["mean"] - served > 0.5 * soft["mean"]
                else "."
            )
        )
    gaps = [
        f"{labels[k]} {summary[k]['soft_minus_hard_recall']['mean']:+.1%} recall, "
        f"{summary[k]['soft_minus_hard_loss']['mean']:+.3f} loss"
        for k in [*trees, roles.get("frozen_router")]
        if k in summary and "soft_minus_hard_recall" in summary[k]
    ]
    if gaps:
        sentences.append("Soft minus served (hard) routing of the same trained trees: " + "; ".join(gaps) + ".")
    if len(trees) > 1:
        sentences.append(
            f"The best tree variant was picked by its mean recall on these same seeds out of {len(trees)}, "
            "which flatters it a little."
        )
    result["text"] = " ".join(sentences)
    return result


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[capacity] {message}", flush=True)
