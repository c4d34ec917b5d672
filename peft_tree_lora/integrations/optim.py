"""An optimiser whose routers learn at their own rate (PEFT's `create_loraplus_optimizer` is the precedent).

The routers of a tree learn through path probabilities, a weaker signal than the leaves' own gradients; a
`router_lr_ratio` above 1 lets them keep up, and wide leaves, which learn fast on whatever tokens they get, want
stable routes instead. Pass the optimiser to the Trainer as `optimizers=(optimizer, None)`; the Trainer then builds
its learning-rate schedule over every group. Without a ratio, each adapter's routers get the ratio the capacity
study found best for its routing scope and leaf rank (`ROUTER_LR_RATIOS`, `router_lr_ratio_for`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROUTER_KEY = ".treelora_router."
ROUTER_GROUP = "treelora_routers"  # marks the routers' parameter groups (RouterFreezeCallback finds them by it)
# Per routing scope, the ratio for narrow leaves (rank <= NARROW_RANK) and for wide ones (rank >= WIDE_RANK), chosen
# on the capacity study's exploration seeds (0 and 100, never its test seeds; docs/RESULTS.md). Block routers did
# best at 8x of 1/4..32x with rank-1 and rank-2 leaves, and at 1/8x of 1/16..8x with rank-8 leaves, where 8x
# lost 15 points; per-module token routers at 2x with rank-1 leaves (of 1, 2, 8), and no ratio of 1/4, 2 or frozen
# stood out with rank-8 ones; sequence routing was explored at 2x only.
ROUTER_LR_RATIOS = {"token": (2.0, 2.0), "block": (8.0, 0.125), "sequence": (2.0, 2.0)}
NARROW_RANK, WIDE_RANK = 2, 8


def router_lr_ratio_for(routing: str, rank: int, asked: float | None = None) -> float:
    """`asked` when given, else the ratio `ROUTER_LR_RATIOS` recommends for the routing scope
    (`TreeLoraConfig.routing`) and the leaf rank (`TreeLoraConfig.r`): its narrow-leaf ratio up to rank
    `NARROW_RANK`, its wide-leaf ratio from `WIDE_RANK` on, and geometrically in between (rank 4: 1x for block
    routing; untested between the measured ranks)."""
    if asked is not None:
        return asked
    if routing not in ROUTER_LR_RATIOS:
        raise ValueError(f"routing must be one of {sorted(ROUTER_LR_RATIOS)}; got {routing!r}.")
    narrow, wide = ROUTER_LR_RATIOS[routing]
    if rank <= NARROW_RANK:
        return narrow
    if rank >= WIDE_RANK:
        return wide
    share = math.log(rank / NARROW_RANK) / math.log(WIDE_RANK / NARROW_RANK)
    return narrow * (wide / narrow) ** share


def tree_lora_param_groups(
    model: nn.Module, lr: float, router_lr_ratio: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The trainable parameters in groups: everything but the routers at `lr`, the routers at `lr *
    router_lr_ratio` without weight decay (it would pull every router towards p = 0.5). With `router_lr_ratio=None`
    each adapter's routers take the ratio recommended for that adapter's routing and rank (one group per ratio)."""
    if router_lr_ratio is not None and not router_lr_ratio > 0:
        raise ValueError(f"router_lr_ratio must be > 0; got {router_lr_ratio!r}.")
    configs = getattr(model, "peft_config", {})
    routers: dict[float, list[nn.Parameter]] = {}
    others = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ROUTER_KEY not in f".{name}":
            others.append(param)
            continue
        adapter = f".{name}".split(ROUTER_KEY, 1)[1].split(".", 1)[0]
        config = configs.get(adapter)
        routing, rank = getattr(config, "routing", "token"), getattr(config, "r", 8)
        ratio = router_lr_ratio_for(routing, rank, router_lr_ratio)
        routers.setdefault(ratio, []).append(param)
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    groups += [
        {"params": params, "lr": lr * ratio, "weight_decay": 0.0, ROUTER_GROUP: True}
        for ratio, params in routers.items()
    ]
    return groups


def create_tree_lora_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-3,
    router_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `tree_lora_param_groups(model, lr, router_lr_ratio, weight_decay)`."""
    return optimizer_cls(tree_lora_param_groups(model, lr, router_lr_ratio, weight_decay), lr=lr, **optimizer_kwargs)
