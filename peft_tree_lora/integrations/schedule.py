"""`SoftWarmupCallback`: train a tree with soft routing for its first steps, then with the adapter's own mode.

Soft mixing lets every leaf learn from every token while the routers are still random; switching to the served
(hard) function afterwards is what makes the trained tree the one that is served. The switch is a Trainer event,
not state in the forward pass: each call still depends only on its inputs, the weights and the current mode.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

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
