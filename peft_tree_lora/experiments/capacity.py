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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model

from ..app.runner import run_training
from ..tuner.errors import TreeLoraUsageError
from .capacity_scoring import (  # noqa: F401  (compute_matched_rank and lora_params_per_rank are used by others)
    FrozenRouterFactory,
    compute_matched_rank,
    lora_params_per_rank,
    progress_line,
    score_run,
)
from .capacity_settings import CapacitySettings
from .capacity_variants import (  # noqa: F401  (ROUTERS_2X and TreeVariant are used by others)
    DEFAULT_FROZEN_ROUTER_OF,
    DEFAULT_TREE_ARMS,
    FROZEN_ROUTER_KEY,
    ROUTERS_2X,
    TREE_VARIANTS,
    TreeVariant,
    frozen_router_key,
    variant,
)
from .capacity_verdict import summarise, verdict
from .common import DOCS_DIR, Arm, command_line, versions, write_json
from .facts import (
    WordTokenizer,
    document_blocks,
    exact_match,
    facts_model,
    held_out_blocks,
    pretrain_base,
    recall_queries,
    train_settings,
)

RESULT_FILE = "capacity.json"
PLOT_FILE = "capacity.png"


@dataclass(frozen=True)
class StudyArm:
    """An arm of the study: its adapter (`arm`), its roles (`lora_r`, `lora_all_leaves`, `compute_matched:<tree>`,
    `tree`, `frozen_router:<tree>`), runner settings on top of the shared ones, and for a control whether its
    routers are frozen after the adapter is attached."""

    arm: Arm
    roles: tuple[str, ...]
    training: tuple[tuple[str, Any], ...] = ()
    freeze_router: bool = False
    grown: bool = False

    @property
    def key(self) -> str:
        return self.arm.key


def tree_arm(key: str, settings: CapacitySettings) -> Arm:
    """The `Arm` of a tree variant of `TREE_VARIANTS`."""
    chosen = variant(key)
    rank = settings.rank * chosen.rank_factor * (settings.depth + 1 if chosen.rank_times_levels else 1)
    label = f"TreeLoRA d={settings.depth} r={rank}, {chosen.label}"
    return Arm(key, label, "tree", rank, settings.depth, options=chosen.config)


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


def matched_lora(settings: CapacitySettings, tokenizer: WordTokenizer, tree: Arm) -> dict[str, int]:
    """`compute_matched_rank` of the `tree` arm's adapter on the study's model (an untrained copy): the tree's active
    parameters per token, LoRA's per rank, and the compute-matched rank."""
    model = facts_model(settings, tokenizer.vocab_size, 128, settings.seeds[0], None)
    return compute_matched_rank(get_peft_model(model, checked_config(tree)))


def study_arms(settings: CapacitySettings, matched: dict[str, dict[str, int]]) -> list[StudyArm]:
    """LoRA r, each tree's compute-matched LoRA and LoRA r * 2**d (one arm per distinct rank, holding every role that
    rank plays), the chosen tree variants, then a frozen-router control (the same tree, routers frozen at init) of each
    tree of `frozen_router_of`."""
    lora_roles: dict[int, list[str]] = {}
    roles = [("lora_r", settings.rank), ("lora_all_leaves", settings.rank * 2**settings.depth)]
    roles += [(f"compute_matched:{key}", figures["rank"]) for key, figures in matched.items()]
    for role, rank in roles:
        lora_roles.setdefault(rank, []).append(role)
    arms = [
        StudyArm(Arm(f"lora{rank}", f"LoRA r={rank}", "lora", rank=rank), tuple(roles))
        for rank, roles in sorted(lora_roles.items())
    ]
    arms += [
        StudyArm(tree_arm(key, settings), ("tree",), variant(key).training, grown=variant(key).grown)
        for key in settings.tree_arms
    ]
    for key in settings.controlled_trees():
        tree = tree_arm(key, settings)
        control = Arm(
            frozen_router_key(key),
            f"{tree.label}, routers frozen at init",
            "tree",
            tree.rank,
            tree.depth,
            options=tree.options,
        )
        arms.append(StudyArm(control, (f"frozen_router:{key}",), variant(key).training, freeze_router=True))
    return arms


@dataclass
class SeedData:
    """What every arm of one seed shares: the base (as a factory), the people, their queries and blocks."""

    seed: int
    base_factory: Callable[[], torch.nn.Module]
    people: list
    queries: list
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    steps: int
    base_info: dict[str, Any]


def seed_data(settings: CapacitySettings, tokenizer: WordTokenizer, seed: int, show_progress: bool) -> SeedData:
    base = pretrain_base(settings, tokenizer, seed, settings.people, show_progress, lambda m: _say(m, show_progress))
    people = base.study_people
    queries = recall_queries(tokenizer, people)
    before = exact_match(base.model, queries, tokenizer.eos_token_id)
    info = {**base.info, "recall_before": sum(before) / len(before)}
    base.model = None
    train_blocks = document_blocks(tokenizer, people, settings.epochs, seed, include_held_out=False)
    factory = functools.partial(facts_model, settings, tokenizer.vocab_size, base.model_length, seed, base.state)
    steps = max(1, train_blocks.shape[0] // settings.batch_size)
    return SeedData(seed, factory, people, queries, train_blocks, held_out_blocks(tokenizer, people[:64]), steps, info)


def train_arm(
    study_arm: StudyArm, data: SeedData, lr: float, settings: CapacitySettings, tokenizer, show_progress: bool
) -> dict[str, Any]:
    """Train one arm on one seed's data at learning rate `lr` and score it."""
    arm = study_arm.arm
    config = checked_config(arm)
    frozen = FrozenRouterFactory(data.base_factory, config, data.seed) if study_arm.freeze_router else None
    # without a ratio of its own, a tree's routers get the one recommended for its routing and rank (the runner's)
    training = replace(train_settings(settings, data.steps, lr, data.seed, show_progress), **dict(study_arm.training))
    if study_arm.grown:
        result = train_grown(arm.key, config, data, training)
    else:
        result = run_training(
            arm.key,
            frozen or data.base_factory,
            data.train_blocks,
            data.eval_blocks,
            training,
            adapter_config=None if frozen else config,
        )
    run = score_run(result, arm, data.seed, tokenizer, data.people, data.queries, data.eval_blocks, frozen)
    run["learning_rate"] = lr
    result.model = None
    return run


def train_grown(key: str, config: PeftConfig, data: SeedData, training: Any) -> Any:
    """Upcycling: train `config`'s tree as a depth-0 tree (a LoRA) on the first share of the data, grow it one level
    (each leaf split into two copies under a new router), train on the next share, and so on to `config.depth`: the
    same steps and data as any other arm, in depth + 1 stages with a warm-up and decay each."""
    stages = config.depth + 1
    shares = data.train_blocks.tensor_split(stages)
    model, result, seconds, steps = data.base_factory, None, 0.0, 0
    for stage, blocks in enumerate(shares):
        if stage:
            model.base_model.grow_tree(seed=data.seed + stage)
        stage_settings = replace(training, steps=max(1, blocks.shape[0] // training.batch_size))
        first = replace(config, depth=0) if stage == 0 else None
        result = run_training(f"{key}-stage{stage}", model, blocks, data.eval_blocks, stage_settings, first)
        model, seconds, steps = result.model, seconds + result.train_seconds, steps + result.steps_done
    return replace(result, name=key, train_seconds=seconds, steps_done=steps)


def run_capacity(settings: CapacitySettings, out_dir: Path = DOCS_DIR, show_progress: bool = True) -> dict:
    """Run the whole study, write `capacity.json` and `capacity.png` into `out_dir`, and return the result dict."""
    settings.validate()
    started = time.perf_counter()
    tokenizer = WordTokenizer()

    # Every tree arm's config is built before any training, so that an arm this version rejects stops the study now.
    matched = {key: matched_lora(settings, tokenizer, tree_arm(key, settings)) for key in settings.tree_arms}
    arms = study_arms(settings, matched)
    for key, figures in matched.items():
        _say(
            f"{key} touches {figures['tree_active_per_token']:,} adapter parameters per token; LoRA costs "
            f"{figures['per_rank']:,} per rank, so its compute-matched LoRA has r={figures['rank']}",
            show_progress,
        )

    validation: list[dict[str, Any]] = []
    chosen = {a.key: settings.lr_grid[0] for a in arms}
    if len(settings.lr_grid) > 1:
        data = seed_data(settings, tokenizer, settings.validation_seed, show_progress)
        for study_arm in arms:
            tried = []
            for lr in settings.lr_grid:
                _say(f"validation seed {data.seed}: {study_arm.arm.label}, learning rate {lr}", show_progress)
                run = train_arm(study_arm, data, lr, settings, tokenizer, show_progress)
                tried.append(run)
                validation.append({"arm": study_arm.key, "learning_rate": lr, "recall": run["recall"]})
            chosen[study_arm.key] = max(tried, key=lambda r: (r["recall"], -r["learning_rate"]))["learning_rate"]
            _say(f"  chosen learning rate {chosen[study_arm.key]}", show_progress)

    runs: list[dict[str, Any]] = []
    bases: list[dict[str, Any]] = []
    for seed in settings.seeds:
        data = seed_data(settings, tokenizer, seed, show_progress)
        bases.append(data.base_info)
        for study_arm in arms:
            _say(f"seed {seed}: N={settings.people}, {study_arm.arm.label}", show_progress)
            run = train_arm(study_arm, data, chosen[study_arm.key], settings, tokenizer, show_progress)
            matched_rank = next(
                (matched[r.split(":")[1]] for r in study_arm.roles if r.startswith("compute_matched:")), None
            )
            if matched_rank is not None and run["trainable_params"] != study_arm.arm.rank * matched_rank["per_rank"]:
                raise RuntimeError(
                    f"LoRA r={study_arm.arm.rank} trains {run['trainable_params']:,} parameters, not "
                    f"{study_arm.arm.rank} x {matched_rank['per_rank']:,}: it adapts other layers than the tree."
                )
            runs.append(run)
            _say(progress_line(run), show_progress)

    data_out = {
        "study": "capacity",
        "command": command_line(),
        "versions": versions(),
        "settings": asdict(settings),
        "vocab_size": tokenizer.vocab_size,
        "compute_matched": matched,
        "learning_rates": chosen,
        "validation": validation,
        "tree_variants": [
            {
                "key": v.key,
                "label": v.label,
                "options": dict(v.config),
                "training": dict(v.training),
                "rank_times_levels": v.rank_times_levels,
                "rank_factor": v.rank_factor,
                "default": v.key in DEFAULT_TREE_ARMS,
            }
            for v in TREE_VARIANTS
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
                "training": dict(a.training),
                "roles": list(a.roles),
            }
            for a in arms
        ],
        "roles": {role: a.key for a in arms for role in a.roles if role != "tree"},
        "runs": runs,
    }
    data_out["summary"] = summarise(data_out["runs"], [a.key for a in arms])
    data_out["verdict"] = verdict(data_out)
    data_out["wall_seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_capacity

    plot_capacity(data_out, out_dir / PLOT_FILE)
    data_out["plot"] = PLOT_FILE
    write_json(out_dir / RESULT_FILE, data_out)
    return data_out


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[capacity] {message}", flush=True)
