"""`TreeRouter`: the sigmoid routers of one tree, as a module whose forward is a pure function of its input."""

from __future__ import annotations

import math

import torch
from torch import nn

from .routing import descend, descend_logits, num_nodes, router_logits


class TreeRouter(nn.Module):
    """The `2**depth - 1` routers of one tree in heap order: `forward(x)` gives their logits (`..., nodes`) and
    `leaf(x)` the hard leaf each row descends to.

    With `input_norm` the routers read `x` divided by its RMS, and the random initialisation draws weights of
    standard deviation `init_scale / sqrt(in_features)`: the logits then start with a spread of about `init_scale`
    whatever the scale of the layer's activations. The weights are stored as `weight` and `bias`, like a Linear's.
    """

    def __init__(
        self, in_features: int, depth: int, input_norm: bool = True, init: str = "random", init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.depth = depth
        self.input_norm = input_norm
        self.weight = nn.Parameter(torch.empty(num_nodes(depth), in_features))
        self.bias = nn.Parameter(torch.zeros(num_nodes(depth)))
        with torch.no_grad():
            if init == "random":
                self.weight.normal_(0.0, init_scale / math.sqrt(in_features))
            else:
                self.weight.zero_()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_logits(x, self.weight, self.bias, self.input_norm)

    def leaf(self, x: torch.Tensor) -> torch.Tensor:
        """Hard leaf per row of `x` (`rows, in`); deep trees evaluate only the routers on each row's way down."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.leaf(x)
        return descend(x.to(self.weight.dtype), self.weight, self.bias, self.depth, self.input_norm)

    def leaf_and_logits(self, x: torch.Tensor, with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hard leaf per row, and the logits of every node when `with_logits` (training, soft evaluation, or a
        mode that scales a leaf by its path probability)."""
        if not with_logits:
            return self.leaf(x), None
        logits = self(x)
        return descend_logits(logits.detach(), self.depth), logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, depth={self.depth}, input_norm={self.input_norm}"
