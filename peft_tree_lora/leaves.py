"""Applying LoRA leaves stored as stacked tensors: A `(L, r, in)` and B `(L, out, r)`.

Soft routing mixes every leaf; hard routing applies one leaf per row. Neither builds a `(tokens, L, out)` tensor:
the soft mix weights the rank-space activations, and the hard path only touches the chosen leaf of each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Hard routing groups rows by leaf and runs one small matmul pair per leaf in use. When leaves are many and rows per
# leaf few, the per-leaf overhead dominates and gathering each row's leaf weights is faster (at the price of
# materialising rows x r x (in + out) gathered weights). Chosen by measurement (benchmarks/bench_tree_lora.py).
GATHER_MAX_ROWS_PER_LEAF = 4


def mix_leaves(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_k weights[..., k] * B_k A_k x` for `x` (`..., in`) and `weights` broadcastable to (`..., L`).

    Costs one rank-`L*r` LoRA: the leaf weights scale the rank-space activations before B is applied.
    """
    num_leaves, rank, in_features = lora_A.shape
    hidden = F.linear(x, lora_A.reshape(num_leaves * rank, in_features))
    hidden = hidden.unflatten(-1, (num_leaves, rank)) * weights.unsqueeze(-1)
    return F.linear(hidden.flatten(-2), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], num_leaves * rank))


def apply_leaf_per_row(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, leaf: torch.Tensor
) -> torch.Tensor:
    """`B_leaf[i] A_leaf[i] x[i]` for every row `i` of `x` (`T, in`): only the chosen leaf of each row is computed."""
    num_leaves = lora_A.shape[0]
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros(0, lora_B.shape[1])
    if num_leaves == 1:
        return F.linear(F.linear(x, lora_A[0]), lora_B[0])
    if rows <= GATHER_MAX_ROWS_PER_LEAF * num_leaves:
        return _gathered(x, lora_A, lora_B, leaf)
    return _grouped(x, lora_A, lora_B, leaf)


def _gathered(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    hidden = torch.bmm(lora_A[leaf], x.unsqueeze(-1))  # (T, r, 1)
    return torch.bmm(lora_B[leaf], hidden).squeeze(-1)


def _grouped(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(leaf)
    counts = torch.bincount(leaf, minlength=lora_A.shape[0]).tolist()
    sorted_x = x.index_select(0, order)
    pieces = []
    start = 0
    for k, count in enumerate(counts):
        if count:
            chunk = sorted_x[start : start + count]
            pieces.append(F.linear(F.linear(chunk, lora_A[k]), lora_B[k]))
            start += count
    out = torch.empty(x.shape[0], lora_B.shape[1], dtype=pieces[0].dtype, device=x.device)
    out.index_copy_(0, order, torch.cat(pieces))
    return out


def apply_leaf_per_sequence(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, leaf: torch.Tensor
) -> torch.Tensor:
    """`B_leaf[b] A_leaf[b] x[b]` for `x` (`B, T, in`) and one leaf per sequence `b`."""
    if lora_A.shape[0] == 1:
        return F.linear(F.linear(x, lora_A[0]), lora_B[0])
    hidden = torch.bmm(x, lora_A[leaf].transpose(1, 2))  # (B, T, r)
    return torch.bmm(hidden, lora_B[leaf].transpose(1, 2))
