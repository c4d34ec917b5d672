"""The maths of a binary routing tree: path probabilities, hard descent, auxiliary losses.

Nodes are kept in heap order: node `n` has its left child at `2n+1` (taken when `p < 0.5`) and its right child at
`2n+2` (taken when `p >= 0.5`). A tree of depth `d` has `2**d - 1` nodes and `2**d` leaves; leaf `k` is the leaf
whose path, read from the root, spells `k` in binary with 1 meaning "right". Nothing here knows about LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Above this many inner nodes a hard descent gathers one router per level instead of evaluating all of them: the
# full evaluation costs (2**d - 1) dot products per token, the gathered descent d of them plus an index gather.
FULL_ROUTER_EVAL_MAX_NODES = 63


def num_nodes(depth: int) -> int:
    return 2**depth - 1


def path_probs(p: torch.Tensor, depth: int) -> torch.Tensor:
    """Leaf weights from the right-probabilities `p` (`..., 2**d - 1`) of every node: `(..., 2**d)`, summing to 1.

    A leaf's weight is the product of `p` (right) or `1 - p` (left) along its path.
    """
    probs = p.new_ones(p.shape[:-1] + (1,))
    for level in range(depth):
        first = 2**level - 1
        p_level = p[..., first : first + 2**level]
        probs = torch.stack((probs * (1 - p_level), probs * p_level), dim=-1).flatten(-2)
    return probs


def descend_logits(logits: torch.Tensor, depth: int) -> torch.Tensor:
    """Hard leaf index (`...`, int64) from the logits of every node (`..., 2**d - 1`): right where logit >= 0."""
    leaf = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    for level in range(depth):
        node = leaf + (2**level - 1)
        right = logits.gather(-1, node.unsqueeze(-1)).squeeze(-1) >= 0
        leaf = leaf * 2 + right
    return leaf


def descend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, depth: int) -> torch.Tensor:
    """Hard leaf index for each row of `x` (`T, in`) through routers `weight` (`2**d - 1, in`) and `bias`.

    Small trees evaluate every router in one matmul; deep trees evaluate only the `d` routers on each row's path, so
    the cost grows with the depth, not with the number of leaves.
    """
    if depth == 0:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if weight.shape[0] <= FULL_ROUTER_EVAL_MAX_NODES:
        return descend_logits(F.linear(x, weight, bias), depth)
    leaf = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for level in range(depth):
        node = leaf + (2**level - 1)
        logit = torch.bmm(weight[node].unsqueeze(1), x.unsqueeze(2)).view(-1) + bias[node]
        leaf = leaf * 2 + (logit >= 0)
    return leaf


def hardening_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Bernoulli entropy, in bits, of the router decisions: 1 when every `p` is 0.5, 0 when all are 0 or 1."""
    entropy = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="mean")
    return entropy / math.log(2)


def load_balance_loss(leaf_weights: torch.Tensor) -> torch.Tensor:
    """KL divergence (nats) of the mean leaf usage from uniform: 0 when every leaf carries the same share."""
    num_leaves = leaf_weights.shape[-1]
    usage = leaf_weights.reshape(-1, num_leaves).mean(0)
    return (usage * torch.log(usage.clamp_min(1e-12) * num_leaves)).sum()


class _AttachAuxiliaryLoss(torch.autograd.Function):
    """Returns `output` unchanged; in backward, feeds a gradient of 1 into `aux_loss`.

    Adding the auxiliary losses to the task loss cannot work under reentrant gradient checkpointing: the routers'
    first forward runs without autograd, so the loss terms would have no graph. Attaching them to the output of the
    layer that computed them makes their gradient flow whenever the output's does, checkpointed or not.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)


def attach_auxiliary_loss(output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """Make `aux_loss` part of every backward pass that goes through `output` (see `_AttachAuxiliaryLoss`)."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return output
    return _AttachAuxiliaryLoss.apply(output, aux_loss)
