"""Applying LoRA leaves stored as stacked tensors: A `(L, r, in)` and B `(L, out, r)`.

Soft routing mixes every leaf; hard routing applies one leaf per row. Neither builds a `(tokens, L, out)` tensor:
the soft mix weights the rank-space activations, and the hard path only touches the chosen leaf of each row.

Hard routing picks a kernel per call from the number of rows and leaves (thresholds measured with `tree-lora bench`
on 2 CPU cores). None of them syncs with the host except the last-resort loop:
- gathered: each row's leaf matrices are gathered and applied by a batched matmul. Fewest operations, but its memory
  traffic is rows x r x (in + out): only for a handful of rows (decoding a few sequences token by token).
- masked dense: every leaf computed and the other leaves' rank activations zeroed. Costs one rank-`L*r` LoRA and
  no sorting: the choice for two leaves, and on devices where `grouped_mm` cannot run (sync-free, unlike the loop).
- grouped: rows sorted by leaf, then one `grouped_mm` per factor for all leaves (`grouped.py`), forward and
  backward. Fastest for many rows; its per-group cost makes it lose when leaves far outnumber rows.
- grouped loop: rows sorted by leaf, one matmul pair per leaf in use. For CPU dtypes `grouped_mm` does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped import grouped_leaves, grouped_leaves_usable

# Up to this many rows, gathering each row's leaf weights beats sorting rows into groups.
GATHER_MAX_ROWS = 8
# Up to this many leaves, computing every leaf and masking beats sorting rows into groups.
MASKED_DENSE_MAX_LEAVES = 2
# grouped_mm pays a fixed cost per leaf, used or not: it is chosen while leaves <= this many times the rows.
GROUPED_MM_MAX_LEAVES_PER_ROW = 2
# Off switch for the grouped_mm kernels (tests use it to compare the kernels with each other).
USE_GROUPED_MM = hasattr(F, "grouped_mm")


def mix_leaves(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """`scaling * sum_k weights[..., k] * B_k A_k x` for `x` (`..., in`) and `weights` broadcastable to (`..., L`).

    Costs one rank-`L*r` LoRA: the leaf weights (and the scaling) multiply the rank-space activations before B is
    applied, so nothing of the output's width is built besides the output itself.
    """
    num_leaves, rank, in_features = lora_A.shape
    hidden = F.linear(x, lora_A.reshape(num_leaves * rank, in_features))
    if scaling != 1.0:
        weights = weights * scaling
    hidden = hidden.unflatten(-1, (num_leaves, rank)) * weights.unsqueeze(-1)
    return F.linear(hidden.flatten(-2), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], num_leaves * rank))


def apply_leaf_per_row(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling * w[i] * B_leaf[i] A_leaf[i] x[i]` for every row `i` of `x` (`T, in`): only each row's leaf is
    computed. The optional `row_weight` `w` (`T`, e.g. the path probability of the row's leaf) is applied to the
    rank activations, `r` numbers per row, rather than to the output (and its gradient comes from them too)."""
    num_leaves = lora_A.shape[0]
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros(0, lora_B.shape[1])
    if num_leaves == 1:
        return F.linear(_scaled(F.linear(x, lora_A[0]), scaling, row_weight), lora_B[0])
    if rows <= GATHER_MAX_ROWS:
        return gathered(x, lora_A, lora_B, leaf, scaling, row_weight)
    if num_leaves <= MASKED_DENSE_MAX_LEAVES:
        return masked_dense(x, lora_A, lora_B, leaf, scaling, row_weight)
    if USE_GROUPED_MM and grouped_leaves_usable(x, lora_A, lora_B):
        if num_leaves <= GROUPED_MM_MAX_LEAVES_PER_ROW * rows:
            return grouped(x, lora_A, lora_B, leaf, scaling, row_weight)
    if x.device.type != "cpu":
        return masked_dense(x, lora_A, lora_B, leaf, scaling, row_weight)
    return grouped_by_loop(x, lora_A, lora_B, leaf, scaling, row_weight)


def gathered(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    hidden = torch.bmm(lora_A.index_select(0, leaf), x.unsqueeze(-1))  # (T, r, 1); index_select beats A[leaf]
    weight = None if row_weight is None else row_weight.unsqueeze(-1)
    return torch.bmm(lora_B.index_select(0, leaf), _scaled(hidden, scaling, weight)).squeeze(-1)


def masked_dense(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    num_leaves, rank, in_features = lora_A.shape
    hidden = F.linear(x, lora_A.reshape(num_leaves * rank, in_features)).view(-1, num_leaves, rank)
    keep = (leaf.unsqueeze(1) == torch.arange(num_leaves, device=leaf.device)).to(hidden.dtype)
    hidden = hidden * _scaled(keep, scaling, row_weight).unsqueeze(-1)
    return F.linear(hidden.flatten(1), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], num_leaves * rank))


def grouped(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    return grouped_leaves(x, lora_A, lora_B, leaf, float(scaling), row_weight)


def grouped_by_loop(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    order, inverse = _sorting(leaf)
    counts = torch.bincount(leaf, minlength=lora_A.shape[0]).tolist()  # one host sync: the loop needs the sizes
    sorted_x = x.index_select(0, order)
    sorted_weight = None if row_weight is None else row_weight.index_select(0, order)
    pieces = []
    start = 0
    for k, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            hidden = F.linear(sorted_x[rows], lora_A[k])
            weight = None if sorted_weight is None else sorted_weight[rows]
            pieces.append(F.linear(_scaled(hidden, scaling, weight), lora_B[k]))
            start += count
    return torch.cat(pieces).index_select(0, inverse)


def _sorting(leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation that sorts rows by leaf, and its inverse (gathering back with `index_select` is several
    times faster on CPU than scattering with `index_copy_`)."""
    order = torch.argsort(leaf)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return order, inverse


def _scaled(hidden: torch.Tensor, scaling: float, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scaling (and a weight per row, `row_weight` broadcast over the last dimension) in the rank space: r numbers
    per row instead of `out`."""
    if row_weight is not None:
        hidden = hidden * (row_weight.to(hidden.dtype) * scaling).unsqueeze(-1)
    elif scaling != 1.0:
        hidden = hidden * scaling
    return hidden


def grouped_mm_usable(*tensors: torch.Tensor) -> bool:
    """Whether `grouped_mm` can run on these operands without autograd (the split router descent): CPU float32
    with 16-byte-aligned strides (row widths that are multiples of 4 floats)."""
    if not USE_GROUPED_MM:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
        if t.shape[-1] % 4 or any(stride % 4 for stride in t.stride() if stride != 1):
            return False
    return True


def apply_leaf_per_sequence(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float = 1.0,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling * w[b] * B_leaf[b] A_leaf[b] x[b]` for `x` (`B, T, in`), one leaf per sequence `b` and an optional
    weight per sequence `w` (`row_weight`, `B`), applied in the rank space."""
    weight = None if row_weight is None else row_weight.unsqueeze(-1)  # (B, 1): broadcast over the tokens
    if lora_A.shape[0] == 1:
        return F.linear(_scaled(F.linear(x, lora_A[0]), scaling, weight), lora_B[0])
    hidden = torch.bmm(x, lora_A.index_select(0, leaf).transpose(1, 2))  # (B, T, r)
    return torch.bmm(_scaled(hidden, scaling, weight), lora_B.index_select(0, leaf).transpose(1, 2))


def apply_one_leaf(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """`scaling * B A x` for one leaf's `A` (`r, in`) and `B` (`out, r`): a plain LoRA."""
    return F.linear(_scaled(F.linear(x, lora_A), scaling), lora_B)


class _MixGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, served, weights, x, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.weights_dim = weights.dim()
        return served.view_as(served)

    @staticmethod
    def backward(ctx, grad):
        x, lora_A, lora_B = ctx.saved_tensors
        num_leaves, rank, in_features = lora_A.shape
        hidden = F.linear(x, lora_A.reshape(num_leaves * rank, in_features))
        projected = torch.matmul(grad.to(lora_B.dtype), lora_B.permute(1, 0, 2).reshape(-1, num_leaves * rank))
        grad_weights = (hidden * projected).unflatten(-1, (num_leaves, rank)).sum(-1) * ctx.scaling
        while grad_weights.dim() > ctx.weights_dim:  # one weight per sequence: sum over its tokens
            grad_weights = grad_weights.sum(1)
        return grad, grad_weights, None, None, None, None


def with_mix_gradient(
    served: torch.Tensor,
    weights: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`served`, unchanged, whose backward also gives the leaf `weights` the gradient they would get if the output
    were the soft mix `mix_leaves(x, A, B, weights)` (leaves and input held fixed): a straight-through estimate.

    Written out rather than as `served + mix - mix.detach()`, which spends a rank-`L*r` LoRA in the forward pass on
    a value that is zero: here only the backward pays, two rank-`L*r` products. `weights` is `(rows, L)` for rows
    of `x`, or `(batch, L)` for `x` of shape `(batch, tokens, in)`."""
    return _MixGradient.apply(served, weights, x.detach(), lora_A.detach(), lora_B.detach(), float(scaling))
