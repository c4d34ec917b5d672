"""Study 1: past saturation. Per seed, pretrain a tiny byte-level Llama from scratch on the embedded corpus until its
held-out loss stops improving, then go on for the same number of fresh tokens several ways and ask: after saturation,
does a tree keep lowering held-out loss at the same per-token compute?

The arms: full training, LoRA r, the **compute-matched LoRA** (the smallest rank whose parameters per token reach the
tree's active parameters per token, routers included; computed from the tree model with
`capacity.compute_matched_rank`, not written down), TreeLoRA d x r with today's defaults (block routing, hard
training), optionally the token- and sequence-routed trees, and LoRA r * 2**d (as many parameters as all the
leaves). Every arm of a seed starts from that seed's saturated base and trains with the same optimiser (AdamW),
steps, warm-up, linear decay and data (a tree's routers at the ratio recommended for its routing and rank); every
adapter is scored as served (evaluation mode, one leaf).

Two disjoint sets of held-out blocks: the **validation** blocks drive the plateau criterion and the curves, the
**test** blocks give the reported losses. Every run goes through `runner.run_training` (the HF Trainer), like
`tree-lora train` and `tree-lora compare`."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from ..app.runner import RunResult, TrainSettings, run_training
from ..tuner.config import TreeLoraConfig
from .common import DOCS_DIR, Arm, ByteTokenizer, command_line, tiny_llama, versions, write_json
from .saturation_data import (  # noqa: F401  (plateau_reached is read by the tests)
    HELD_OUT_SHUFFLE_SEED,
    Blocks,
    ConstantLearningRate,
    SaturationSettings,
    StopAtPlateau,
    corpus_blocks,
    held_out_loss,
    plateau_reached,
    seed_pools,
)
from .saturation_verdict import _stop_summary, leaf_usage_entropy, summarise, verdict  # noqa: F401

RESULT_FILE = "saturation.json"
PLOT_FILE = "saturation_loss.png"
CONTROL_KEY = "full_constant"


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


def tree_arm(settings: SaturationSettings, routing: str | None = None) -> Arm:
    """The tree of today's defaults (hard training) at the study's depth and rank, with `routing` (None: the
    config's default, block routing)."""
    key = "tree" if routing is None else f"tree_{routing}"
    label = f"TreeLoRA d={settings.depth} r={settings.rank}, {routing or TreeLoraConfig.routing} routing"
    return Arm(key, label, "tree", settings.rank, settings.depth, routing)


def compute_matched(settings: SaturationSettings) -> dict[str, int]:
    """The default tree's active parameters per token and its compute-matched LoRA rank (see
    `capacity.compute_matched_rank`), computed on the study's model."""
    from .capacity import compute_matched_rank

    probe = get_peft_model(model_factory(settings, settings.seeds[0])(), tree_arm(settings).adapter_config())
    return compute_matched_rank(probe)


def study_arms(settings: SaturationSettings, matched_rank: int) -> list[StudyArm]:
    """Full training, with `plateau_control` the control (pretraining simply goes on: full training at the constant
    pretraining rate, which shows how much the base itself still gains over the continuation's tokens), the LoRA
    ranks (r, compute-matched, r * 2**d; one arm per distinct rank, holding every role that rank plays), the
    tree of the defaults (block routing) and, with `tree_token` and `tree_sequence`, the token- and sequence-routed
    trees."""
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
    if settings.tree_token:
        arms.append(StudyArm(tree_arm(settings, "token"), ("tree_token",)))
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


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[saturation] {message}", flush=True)
