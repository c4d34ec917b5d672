"""Matching, controlling and scoring the arms of the capacity study: the compute-matched LoRA rank, the frozen-router
control's model factory, and the figures of one trained arm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import set_seed
from transformers.pytorch_utils import Conv1D

from ..app.runner import leaf_usage
from ..tuner.errors import TreeLoraUsageError
from .common import Arm
from .facts import WordTokenizer, exact_match, recall_scores, soft_inference
from .saturation import leaf_usage_entropy

ROUTER_PARAMETER = "treelora_router"  # in the name of every router parameter (token and sequence routers)


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
    active parameters per token (one leaf per layer plus the routers a token runs: `depth` per module for token
    routing, per block for block routing, none per token for sequence routing)."""
    active = tree_model.base_model.parameter_counts()["active_per_token"]
    per_rank = lora_params_per_rank(tree_model)
    if per_rank == 0:
        raise TreeLoraUsageError("the tree model has no adapted Linear layers to match a LoRA to.")
    return {"rank": max(1, math.ceil(active / per_rank)), "tree_active_per_token": active, "per_rank": per_rank}


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


def score_run(
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


def progress_line(run: dict[str, Any]) -> str:
    line = (
        f"  held-out recall {run['recall']:.1%} (seen paraphrase {run['recall_seen_paraphrase']:.1%}), "
        f"{run['bits']:.0f} bits, {run['bits_per_active_param']:.3f} bits/active param, "
        f"{run['train_seconds']:.0f} s"
    )
    if run["recall_soft"] is not None:
        line += f"; soft routing: recall {run['recall_soft']:.1%}, loss {run['soft_minus_hard_loss']:+.3f}"
    return line
