"""Leaf layouts: where a tree's LoRA factors live, a per-adapter strategy kept out of the layer's forward the way LoRA
keeps DoRA in `lora_variant`.

- `"leaf"`: each leaf holds a LoRA of rank `r` (`treelora_A` `(L, r, in)`, `treelora_B` `(L, out, r)`) and a token
  applies its leaf's.
- `"path"`: every node of the tree holds a LoRA, the `2**d - 1` inner nodes of rank `r_node`
  (`treelora_node_A` `(2**d - 1, r_node, in)`, `treelora_node_B` `(2**d - 1, out, r_node)`, heap order) and the leaves
  of rank `r_leaf = r - d * r_node` (`treelora_A`, `treelora_B`); a token applies the sum of the LoRAs on its path,
  root to leaf. That sum is one LoRA of rank `d * r_node + r_leaf = r` whose factors are the path's factors
  concatenated along the rank axis, so each forward pass builds these *effective leaves*, `(L, r, in)` and
  `(L, out, r)`, by a differentiable gather (`L * r * (in + out)` copied numbers, far less than one batch's
  activations), and every kernel, training routing, routing scope, merge and export works on them unchanged. The
  root learns from every token, a node at depth `j` from the tokens of its `2**(d - j)` leaves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import TreeLoraConfig
    from .layer import TreeLoraLinear

NODE_NAMES = ("treelora_node_A", "treelora_node_B")


def lora_factors(count: int, rank: int, in_features: int, out_features: int, zero_B: bool) -> tuple[nn.Parameter, ...]:
    """`count` stacked LoRA factors initialised as LoRA does: A `(count, rank, in)` uniform in +-1/sqrt(in) (its
    kaiming-uniform(a=sqrt(5)) bound), B `(count, out, rank)` zero, or uniform in +-1/sqrt(rank) (tests)."""
    bound = 1.0 / math.sqrt(in_features)
    lora_A = torch.empty(count, rank, in_features).uniform_(-bound, bound)
    if zero_B:
        lora_B = torch.zeros(count, out_features, rank)
    else:
        lora_B = torch.empty(count, out_features, rank).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank))
    return nn.Parameter(lora_A), nn.Parameter(lora_B)


def path_nodes(depth: int, leaves: torch.Tensor) -> torch.Tensor:
    """`(len(leaves), depth)`: the heap indices of the inner nodes on the path to each leaf, root first (the ancestor
    at depth `j` of leaf `k` is node `((k + 2**d) >> (d - j)) - 1`)."""
    shifts = torch.arange(depth, 0, -1, device=leaves.device)
    return ((leaves.unsqueeze(1) + 2**depth) >> shifts) - 1


def path_factors(
    leaf_A: torch.Tensor,
    leaf_B: torch.Tensor,
    node_A: torch.Tensor | None,
    node_B: torch.Tensor | None,
    leaves: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The effective leaves of a path layout: for each leaf of `leaves` (default: all), A `(r, in)` and B `(out, r)`
    of the sum of the LoRAs on its path, the path's factors concatenated along the rank axis, root first and the
    leaf last. Without inner nodes (`node_A` None: the `"leaf"` layout, or depth 0) these are the leaves' own."""
    if leaves is None:
        leaves = torch.arange(leaf_A.shape[0], device=leaf_A.device)
    if node_A is None or node_A.shape[0] == 0:
        return leaf_A[leaves], leaf_B[leaves]
    depth = leaf_A.shape[0].bit_length() - 1
    nodes = path_nodes(depth, leaves)  # (n, d)
    count, (_, node_rank, in_features), out_features = nodes.shape[0], node_A.shape, node_B.shape[1]
    path_A = node_A[nodes].reshape(count, depth * node_rank, in_features)
    path_B = node_B[nodes].permute(0, 2, 1, 3).reshape(count, out_features, depth * node_rank)
    return torch.cat([path_A, leaf_A[leaves]], dim=1), torch.cat([path_B, leaf_B[leaves]], dim=2)


class LeafOnly:
    """Each leaf holds its own LoRA of rank `r`: the leaves are the stored tensors."""

    name = "leaf"

    def create(self, layer: TreeLoraLinear, adapter: str, config: TreeLoraConfig) -> None:
        return None

    def factors(self, layer: TreeLoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.treelora_A[adapter], layer.treelora_B[adapter]


class PathNodes(LeafOnly):
    """Every node of a path holds a LoRA; a leaf's effective factors are its path's, gathered per forward pass."""

    name = "path"

    def create(self, layer: TreeLoraLinear, adapter: str, config: TreeLoraConfig) -> None:
        node_rank, _ = config.path_ranks()
        if config.depth == 0:
            return
        node_A, node_B = lora_factors(
            2**config.depth - 1, node_rank, layer.in_features, layer.out_features, config.init_lora_weights
        )
        layer.treelora_node_A[adapter] = node_A
        layer.treelora_node_B[adapter] = node_B

    def factors(self, layer: TreeLoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        if adapter not in layer.treelora_node_A:
            return super().factors(layer, adapter)
        return path_factors(
            layer.treelora_A[adapter],
            layer.treelora_B[adapter],
            layer.treelora_node_A[adapter],
            layer.treelora_node_B[adapter],
        )


LEAF_LAYOUTS = {layout.name: layout() for layout in (LeafOnly, PathNodes)}
