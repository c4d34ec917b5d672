"""Study 1: past saturation. Per seed, pretrain a tiny byte-level Llama from scratch on the embedded corpus until its
held-out loss stops improving, then go on for the same number of fresh tokens several ways and ask: after saturation,
does a tree keep lowering held-out loss at the same per-token compute?

The arms: full training, LoRA r, the **compute-matched LoRA** (the smallest rank whose parameters per token reach the
tree's active parameters per token, routers included; computed from the tree model with
`capacity.compute_matched_rank`, not written down), TreeLoRA d x r with today's defaults (token routing, hard
training), optionally the sequence-routed tree, and LoRA r * 2**d (as many parameters as all the leaves). Every arm
of a seed starts from that seed's saturated base and trains with the same optimiser (AdamW), steps, warm-up, linear
decay and data; every adapter is scored as served (evaluation mode, one leaf).

Two disjoint sets of held-out blocks: the **validation** blocks drive the plateau criterion and the curves, the
**test** blocks give the reported losses. Every run goes through `runner.run_training` (the HF Trainer), like
`tree-lora train` and `tree-lora compare`."""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import TrainerCallback

from ..app.data import load_corpus, tokenize_blocks
from ..app.runner import RunResult, TrainSettings, run_training
from ..tuner.errors import TreeLoraUsageError
from .common import DOCS_DIR, Arm, ByteTokenizer, command_line, tiny_llama, versions, write_json

RESULT_FILE = "saturation.json"
PLOT_FILE = "saturation_loss.png"
CONTROL_KEY = "full_constant"
HELD_OUT_SHUFFLE_SEED = 1234  # fixes which held-out blocks are validation and which are test, for every seed


@dataclass
class SaturationSettings:
    """Defaults sized to finish within about 30 minutes on 2 CPU cores with one torch thread; the timings behind
    them (one torch thread, 16 x 128-byte blocks a step, measured on this 2-core machine, idle unless noted):

    - The 1.28 M-parameter model of the previous run was still falling 5 % per 160 steps after 640 steps. At one
      thread a training step costs 0.18 s (hidden 64, 4 layers, 0.22 M parameters; loaded machine), 0.094-0.116 s
      (hidden 48, 3 layers, 95 k) and 0.057-0.069 s (hidden 32, 3 layers, 48 k), evaluation 1-4 ms a block.
    - Pretraining curves at a constant 3e-3 (1e-2 learns slower): none of them flattens out within the data (4.7 M
      bytes, so longer runs repeat the pool). After 2,200 steps the 0.22 M and 95 k models still fall about 0.5 %
      per 100 steps; the 95 k model at 4,000 steps still 1.5 % per 1,000 steps. The 48 k model (hidden 32, 3 layers)
      falls below 1 % per 1,000 steps from about 4,800 steps on (1.666 -> 1.634 by step 6,000, 416 s): with the
      criterion below (best of the last 10 evaluations, 1,000 steps or 2 M tokens, less than 1 % under the best
      before) it stops at 4,800 on seed 0. Shorter windows (200-500 steps) stop on noise as early as step 1,150,
      after which the loss fell another 8 %.
    - Continuation, 250 steps from that seed-0 base (train seconds): full 13, LoRA r=4 16, LoRA r=16 18, the d=3
      r=2 tree 55 (hard routing costs about 3.5 LoRA steps). At learning rate 3e-3 against 1e-2 on the validation
      blocks: full 0.047 against 0.016 gain, LoRA r=4 0.039 against 0.040, the tree 0.045 against 0.042, LoRA
      r=16 0.046 against 0.043; so every arm uses 3e-3, the pretraining rate (seed 0 is not a study seed).
    - Budget: about 300 s of pretraining and 200 s of continuation a seed, 25 min for three seeds; at most
      `max_pretrain_steps` (8,000 steps, about 400 s) a seed if the plateau comes late. The default run (1 December
      2026, `--threads 1`, load average about 1) took 18.8 min: plateaus at steps 5,600, 5,100 and 5,000 (207-246 s
      of pretraining each), about 125 s of continuation training a seed (the token-routed tree 40-49 s of it).

    `rank` 2 keeps LoRA r * 2**d (16) below the hidden size (32), so that it is still a low-rank arm."""

    hidden: int = 32
    layers: int = 3
    heads: int = 4
    intermediate: int = 96
    block_length: int = 128
    batch_size: int = 16
    pretrain_lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 100
    continue_eval_every: int = 50
    eval_blocks: int = 256
    test_blocks: int = 1024
    patience: int = 10
    min_improvement: float = 0.01
    max_pretrain_steps: int = 8000
    continue_steps: int = 250
    adapter_lr: float = 3e-3
    rank: int = 2
    depth: int = 3
    tree_sequence: bool = True
    plateau_control: bool = True
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    data: str = "embedded"

    def validate(self) -> None:
        for name in (
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "block_length",
            "batch_size",
            "eval_every",
            "continue_eval_every",
            "eval_blocks",
            "test_blocks",
        ):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise TreeLoraUsageError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}).")
        if self.patience < 1 or not 0 <= self.min_improvement < 1:
            raise TreeLoraUsageError("--patience must be >= 1 and --min-improvement in [0, 1).")
        if self.max_pretrain_steps <= self.warmup_steps or self.continue_steps <= self.warmup_steps:
            raise TreeLoraUsageError(
                f"--max-pretrain-steps and --continue-steps must exceed the warm-up ({self.warmup_steps} steps)."
            )
        if self.rank < 1 or not 1 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 1..10; got {self.rank}, {self.depth}.")
        for name in ("pretrain_lr", "adapter_lr"):
            if not 0 < getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be in (0, 1); got {getattr(self, name)}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TreeLoraUsageError(f"--seeds needs one or more distinct seeds; got {self.seeds}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_length


class StopAtPlateau(TrainerCallback):
    """The saturation criterion: stop once the best held-out loss of the last `patience` evaluations is not at
    least `min_improvement` (relative) below the best loss before them."""

    def __init__(self, patience: int, min_improvement: float) -> None:
        self.patience, self.min_improvement = patience, min_improvement
        self.losses: list[float] = []
        self.stopped_at_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return control
        self.losses.append(float(metrics["eval_loss"]))
        if plateau_reached(self.losses, self.patience, self.min_improvement) and self.stopped_at_step is None:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
        return control


def plateau_reached(losses: list[float], patience: int, min_improvement: float) -> bool:
    """True when the last `patience` losses improve on the best earlier loss by less than `min_improvement`."""
    if len(losses) <= patience:
        return False
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) > best_before * (1.0 - min_improvement)


class ConstantLearningRate(TrainerCallback):
    """Holds the learning rate constant after the warm-up during pretraining. The runner's linear decay would keep
    the loss falling until the rate reaches zero, so a plateau could not be told apart from the schedule."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if lr_scheduler is None:
            raise RuntimeError("the Trainer passed no learning-rate scheduler to its callbacks")
        warmup = self.warmup_steps
        lr_scheduler.lr_lambdas = [lambda step: min(1.0, (step + 1) / max(1, warmup))] * len(lr_scheduler.lr_lambdas)
        return control


@dataclass
class Blocks:
    """The corpus as token blocks: every training block (in corpus order), the validation and the test blocks."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    description: str


def corpus_blocks(settings: SaturationSettings) -> Blocks:
    """Training blocks and two disjoint sets of held-out blocks (validation, then test) drawn from the held-out
    documents in one fixed shuffled order."""
    corpus = load_corpus(settings.data)
    tokenizer = ByteTokenizer()
    train = tokenize_blocks(tokenizer, corpus.train, settings.block_length)
    held_out = tokenize_blocks(tokenizer, corpus.held_out, settings.block_length)
    needed = (settings.continue_steps + 1) * settings.batch_size
    if train.shape[0] < needed:
        raise TreeLoraUsageError(
            f"the corpus gives {train.shape[0]} training blocks of {settings.block_length} bytes; this study needs "
            f"more than the {settings.continue_steps * settings.batch_size} it keeps for the continuation (fewer "
            "continuation steps, a smaller batch or a larger corpus)."
        )
    if held_out.shape[0] < 2:
        raise TreeLoraUsageError("the corpus has too little held-out text for a validation and a test block.")
    order = list(range(held_out.shape[0]))
    random.Random(HELD_OUT_SHUFFLE_SEED).shuffle(order)
    validation_count = min(settings.eval_blocks, held_out.shape[0] // 2)
    test_count = min(settings.test_blocks, held_out.shape[0] - validation_count)
    validation = held_out[order[:validation_count]]
    test = held_out[order[validation_count : validation_count + test_count]]
    return Blocks(train, validation, test, corpus.description)


def seed_pools(settings: SaturationSettings, train: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In a shuffled order of the training blocks that depends on the seed: the last `continue_steps x batch_size`
    blocks are kept for the continuation (fresh: pretraining never draws them), the rest is the pretraining pool,
    which pretraining goes through again (in a new order each epoch) when it needs more steps than the pool has."""
    order = list(range(train.shape[0]))
    random.Random(seed).shuffle(order)
    shuffled = train[order]
    kept = settings.continue_steps * settings.batch_size
    return shuffled[:-kept], shuffled[-kept:]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss on `blocks` in evaluation mode (as served: the adapter's inference routing, one leaf),
    weighted by block like the runner's evaluation."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    model.train(was_training)
    return total / blocks.shape[0]


@dataclass(frozen=True)
class StudyArm:
    """An arm and the roles it plays: `full`, `lora_r`, `compute_matched`, `lora_all_leaves`, `tree`,
    `tree_sequence`. One LoRA rank that plays several roles is one arm."""

    arm: Arm
    roles: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.arm.key


def model_factory(settings: SaturationSettings, seed: int, state: dict[str, torch.Tensor] | None = None):
    """A factory of the study's Llama: initialised from `seed`, then loaded with `state` when given."""

    def build() -> torch.nn.Module:
        model = tiny_llama(
            ByteTokenizer.vocab_size,
            settings.hidden,
            settings.layers,
            settings.heads,
            settings.intermediate,
            settings.block_length,
            seed=seed,
        )
        if state is not None:
            model.load_state_dict(copy.deepcopy(state))
        return model

    return build


def tree_arm(settings: SaturationSettings, routing: str = "token") -> Arm:
    """The tree of today's defaults (hard training) at the study's depth and rank, with `routing`."""
    key = "tree" if routing == "token" else f"tree_{routing}"
    label = f"TreeLoRA d={settings.depth} r={settings.rank}, {routing} routing"
    return Arm(key, label, "tree", settings.rank, settings.depth, routing)


def compute_matched(settings: SaturationSettings) -> dict[str, int]:
    """The token-routed tree's active parameters per token and its compute-matched LoRA rank (see
    `capacity.compute_matched_rank`), computed on the study's model."""
    from .capacity import compute_matched_rank

    probe = get_peft_model(model_factory(settings, settings.seeds[0])(), tree_arm(settings).adapter_config())
    return compute_matched_rank(probe)


def study_arms(settings: SaturationSettings, matched_rank: int) -> list[StudyArm]:
    """Full training, with `plateau_control` the control (pretraining simply goes on: full training at the constant
    pretraining rate, which shows how much the base itself still gains over the continuation's tokens), the LoRA
    ranks (r, compute-matched, r * 2**d; one arm per distinct rank, holding every role that rank plays), the
    token-routed tree and, with `tree_sequence`, the sequence-routed tree."""
    lora_roles: dict[int, list[str]] = {}
    for role, rank in (
        ("lora_r", settings.rank),
        ("compute_matched", matched_rank),
        ("lora_all_leaves", settings.rank * 2**settings.depth),
    ):
        lora_roles.setdefault(rank, []).append(role)
    arms = [StudyArm(Arm("full", "full training (base alone)", "full"), ("full",))]
    if settings.plateau_control:
        control = Arm(CONTROL_KEY, "full training at the constant pretraining rate (pretraining goes on)", "full")
        arms.append(StudyArm(control, ("plateau_control",)))
    arms += [
        StudyArm(Arm(f"lora{rank}", f"LoRA r={rank}", "lora", rank=rank), tuple(roles))
        for rank, roles in sorted(lora_roles.items())
    ]
    arms.append(StudyArm(tree_arm(settings), ("tree",)))
    if settings.tree_sequence:
        arms.append(StudyArm(tree_arm(settings, "sequence"), ("tree_sequence",)))
    return arms


def pretrain_base(settings: SaturationSettings, blocks: Blocks, seed: int, show_progress: bool) -> dict[str, Any]:
    """Pretrain the seed's base until the plateau criterion (or the step budget) stops it; returns its figures and
    its weights (`state`)."""
    pool, fresh = seed_pools(settings, blocks.train, seed)
    stopper = StopAtPlateau(settings.patience, settings.min_improvement)
    result = run_training(
        f"pretrain_seed{seed}",
        model_factory(settings, seed),
        pool,
        blocks.validation,
        _train_settings(settings, settings.max_pretrain_steps, settings.pretrain_lr, seed, show_progress),
        callbacks=[ConstantLearningRate(settings.warmup_steps), stopper],
    )
    reached = stopper.stopped_at_step is not None
    curve = [list(p) for p in result.eval_curve]
    window = settings.patience
    stop_reason = (
        f"plateau criterion met at step {stopper.stopped_at_step}"
        if reached
        else f"step budget of {settings.max_pretrain_steps} reached before the plateau criterion was met"
    )
    base = {
        "seed": seed,
        "curve": curve,
        "steps": result.steps_done,
        "tokens": result.steps_done * settings.tokens_per_step,
        "pool_tokens": int(pool.numel()),
        "epochs": result.steps_done * settings.batch_size / pool.shape[0],
        "final_loss": result.final_eval_loss,
        "best_loss": min(p[2] for p in curve),
        # relative fall of the best validation loss over the last `patience` evaluations, the criterion's quantity
        "last_window_improvement": 1 - min(p[2] for p in curve[-window:]) / min(p[2] for p in curve[:-window])
        if len(curve) > window
        else None,
        "test_loss": held_out_loss(result.model, blocks.test),
        "train_seconds": result.train_seconds,
        "stop_reason": stop_reason,
        "plateau_reached": reached,
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "continuation_blocks": fresh,
    }
    result.model = None
    return base


def run_saturation(settings: SaturationSettings, out_dir: Path = DOCS_DIR, show_progress: bool = True) -> dict:
    """Run the whole study, write `saturation.json` and the plot into `out_dir`, and return the result dict."""
    settings.validate()
    started = time.perf_counter()
    blocks = corpus_blocks(settings)
    base_params = sum(p.numel() for p in model_factory(settings, settings.seeds[0])().parameters())
    matched = compute_matched(settings)
    arms = study_arms(settings, matched["rank"])
    _say(
        f"the tree touches {matched['tree_active_per_token']:,} adapter parameters per token; LoRA costs "
        f"{matched['per_rank']:,} per rank, so the compute-matched LoRA has r={matched['rank']}",
        show_progress,
    )

    bases: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for seed in settings.seeds:
        _say(
            f"seed {seed}: pretraining a {base_params / 1e6:.2f} M-parameter Llama until validation loss stops "
            "improving",
            show_progress,
        )
        base = pretrain_base(settings, blocks, seed, show_progress)
        state, fresh = base.pop("state"), base.pop("continuation_blocks")
        bases.append(base)
        _say(
            f"seed {seed}: {base['stop_reason']}; validation loss {base['final_loss']:.4f}, "
            f"test {base['test_loss']:.4f}",
            show_progress,
        )
        for study_arm in arms:
            arm = study_arm.arm
            lr = settings.pretrain_lr if arm.kind == "full" else settings.adapter_lr
            control = "plateau_control" in study_arm.roles
            result = run_training(
                arm.key,
                model_factory(settings, seed, state),
                fresh,
                blocks.validation,
                _train_settings(settings, settings.continue_steps, lr, seed, show_progress, continuation=True),
                adapter_config=arm.adapter_config(),
                callbacks=[ConstantLearningRate(settings.warmup_steps)] if control else (),
            )
            if "compute_matched" in study_arm.roles and result.trainable_params != arm.rank * matched["per_rank"]:
                raise RuntimeError(
                    f"LoRA r={arm.rank} trains {result.trainable_params:,} parameters, not {arm.rank} x "
                    f"{matched['per_rank']:,}: it adapts other layers than the tree."
                )
            run = _summarise(result, arm.key, seed, base, lr, blocks.test)
            runs.append(run)
            result.model = None
            _say(
                f"seed {seed}: {arm.label}: test loss {run['test_loss']:.4f} ({-run['improvement']:+.4f}), "
                f"{run['train_seconds']:.0f} s",
                show_progress,
            )
        del state

    data: dict[str, Any] = {
        "study": "saturation",
        "command": command_line(),
        "versions": versions(),
        "settings": asdict(settings),
        "corpus": blocks.description,
        "train_blocks_available": int(blocks.train.shape[0]),
        "validation_tokens": int(blocks.validation.numel()),
        "test_tokens": int(blocks.test.numel()),
        "base_params": base_params,
        "compute_matched": matched,
        "arms": [
            {
                "key": a.key,
                "label": a.arm.label,
                "kind": a.arm.kind,
                "rank": a.arm.rank,
                "depth": a.arm.depth,
                "routing": a.arm.routing if a.arm.kind == "tree" else None,
                "roles": list(a.roles),
            }
            for a in arms
        ],
        "roles": {role: a.key for a in arms for role in a.roles},
        "bases": bases,
        "plateau_reached": all(b["plateau_reached"] for b in bases),
        # the CLI's one-line summary reads pretrain.stop_reason
        "pretrain": {"stop_reason": _stop_summary(bases, settings.max_pretrain_steps)},
        "continue_tokens": settings.continue_steps * settings.tokens_per_step,
        "runs": runs,
    }
    data["summary"] = summarise(runs, [a.key for a in arms])
    data["verdict"] = verdict(data)
    data["wall_seconds"] = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_saturation

    plot_saturation(data, out_dir / PLOT_FILE)
    data["plot"] = PLOT_FILE
    write_json(out_dir / RESULT_FILE, data)
    return data


SUMMARY_METRICS = ("test_loss", "improvement", "validation_loss", "train_seconds")


def summarise(runs: list[dict[str, Any]], arm_keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and metric: mean, min, max and n over the seeds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in arm_keys:
        summary[key] = {}
        for metric in SUMMARY_METRICS:
            values = [r[metric] for r in runs if r["arm"] == key and r.get(metric) is not None]
            if values:
                summary[key][metric] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
    return summary


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


def _train_settings(
    settings: SaturationSettings, steps: int, lr: float, seed: int, show_progress: bool, continuation: bool = False
) -> TrainSettings:
    every = settings.continue_eval_every if continuation else settings.eval_every
    return TrainSettings(
        steps=steps,
        batch_size=settings.batch_size,
        learning_rate=lr,
        eval_every=every,
        eval_batch_size=64,
        seed=seed,
        warmup_steps=settings.warmup_steps,
        show_progress=show_progress,
        log_every=every,
    )


def _summarise(
    result: RunResult, arm: str, seed: int, base: dict[str, Any], lr: float, test: torch.Tensor
) -> dict[str, Any]:
    usage = result.leaf_usage or {}
    test_loss = held_out_loss(result.model, test)
    return {
        "seed": seed,
        "arm": arm,
        # (step, tokens since the saturated checkpoint, validation loss)
        "curve": [list(p) for p in result.eval_curve],
        "validation_loss": result.final_eval_loss,
        "test_loss": test_loss,
        "improvement": base["test_loss"] - test_loss,
        "learning_rate": lr,
        "trainable_params": result.trainable_params,
        "active_params_per_token": result.active_params_per_token,
        "train_seconds": result.train_seconds,
        "steps": result.steps_done,
        "leaf_usage_entropy": leaf_usage_entropy(usage) if usage else None,
    }


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


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[saturation] {message}", flush=True)
