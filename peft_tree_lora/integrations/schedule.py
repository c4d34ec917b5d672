"""Trainer callbacks that change how a tree trains over time.

`SoftWarmupCallback`: train a tree with soft routing for its first steps, then with the adapter's own mode.
`RouterFreezeCallback`: let the routers learn for the first steps only, then keep the routes they found.

Soft mixing lets every leaf learn from every token while the routers are still random; switching to the served
(hard) function afterwards is what makes the trained tree the one that is served. The switch is a Trainer event,
not state in the forward pass: each call still depends only on its inputs, the weights and the current mode.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from .optim import ROUTER_GROUP
from .telemetry import find_tree_tuner


class SoftWarmupCallback(TrainerCallback):
    """Soft training routing for the first `steps` optimiser steps, then each adapter's configured mode."""

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"SoftWarmupCallback(steps) needs an integer >= 0; got {steps!r}.")
        self.steps = steps
        self._tuner = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        self._tuner = find_tree_tuner(model)
        self._apply(state.global_step)

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self._apply(state.global_step)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self._tuner is not None:
            self._restore()

    def _apply(self, step: int) -> None:
        if self._tuner is None:
            return
        if step < self.steps:
            self._tuner.set_training_routing("soft")
        else:
            self._restore()

    def _restore(self) -> None:
        for name, config in self._tuner.peft_config.items():
            self._tuner.set_training_routing(config.training_routing, name)


class RouterFreezeCallback(TrainerCallback):
    """The routers learn for the first `steps` optimiser steps, then stop (their groups' learning rate is held at
    0), so the leaves go on learning on routes that no longer move. Needs the optimiser of
    `create_tree_lora_optimizer`, whose router groups it recognises. Setting the rate, rather than `requires_grad`,
    keeps DDP's gradient buckets and the optimiser state as they were."""

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"RouterFreezeCallback(steps) needs an integer >= 0; got {steps!r}.")
        self.steps = steps

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs: Any) -> None:
        if optimizer is not None and not any(group.get(ROUTER_GROUP) for group in optimizer.param_groups):
            raise ValueError(
                "RouterFreezeCallback needs the routers in groups of their own: build the optimiser with "
                "peft_tree_lora.integrations.optim.create_tree_lora_optimizer and pass it as "
                "Trainer(..., optimizers=(optimizer, None))."
            )

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs: Any) -> None:
        # after the previous step's scheduler update, before this step's optimiser update
        if optimizer is not None and state.global_step >= self.steps:
            for group in optimizer.param_groups:
                if group.get(ROUTER_GROUP):
                    group["lr"] = 0.0
