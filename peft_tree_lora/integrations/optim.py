"""An optimiser whose routers learn at their own rate (PEFT's `create_loraplus_optimizer` is the precedent).

The routers of a tree learn through path probabilities, a weaker signal than the leaves' own gradients; a
`router_lr_ratio` above 1 lets them keep up. Pass the optimiser to the Trainer as `optimizers=(optimizer, None)`;
the Trainer then builds its learning-rate schedule over every group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROUTER_KEY = ".treelora_router."


def tree_lora_param_groups(
    model: nn.Module, lr: float, router_lr_ratio: float = 1.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Two parameter groups of the trainable parameters: the routers at `lr * router_lr_ratio` (no weight decay:
    it would pull every router towards p = 0.5) and everything else at `lr`."""
    if not router_lr_ratio > 0:
        raise ValueError(f"router_lr_ratio must be > 0; got {router_lr_ratio!r}.")
    routers, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (routers if ROUTER_KEY in f".{name}" else others).append(param)
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if routers:
        groups.append({"params": routers, "lr": lr * router_lr_ratio, "weight_decay": 0.0})
    return groups


def create_tree_lora_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-3,
    router_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `tree_lora_param_groups(model, lr, router_lr_ratio, weight_decay)`."""
    return optimizer_cls(tree_lora_param_groups(model, lr, router_lr_ratio, weight_decay), lr=lr, **optimizer_kwargs)
