"""One leaf per row as two grouped matmuls: rows sorted by leaf, then one `grouped_mm` per factor for every leaf at
once, forward and backward, with no host sync.

It is a custom operator (`torch.ops.peft_tree_lora.grouped_leaves`) for two reasons. `torch.compile` cannot trace
`grouped_mm` in float32 (its fake-tensor check insists on bf16), while an operator with its own fake implementation
is one opaque node with a known output shape. And its backward is written out: PyTorch's own `grouped_mm` backward
refuses gradients with zero strides and computes nothing this one does not.

`grouped_mm` wants 16-byte-aligned strides, so ranks that are not a multiple of 4 floats are zero-padded (the
padded rank carries no gradient to the real one) and widths that are not are refused by `grouped_leaves_usable`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _alignment(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def _padded_rank(rank: int, dtype: torch.dtype) -> int:
    align = _alignment(dtype)
    return -(-rank // align) * align


def _grouping(leaf: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The order that sorts rows by leaf, its inverse, and each leaf's end offset in the sorted rows (int32)."""
    order = torch.argsort(leaf)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    leaves = torch.arange(num_leaves, device=leaf.device)
    ends = torch.searchsorted(leaf.index_select(0, order), leaves, right=True).to(torch.int32)
    return order, inverse, ends


def _pad(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank = lora_A.shape[1]
    extra = _padded_rank(rank, lora_A.dtype) - rank
    if not extra:
        return lora_A, lora_B
    return F.pad(lora_A, (0, 0, 0, extra)), F.pad(lora_B, (0, extra))


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """The leaves' `(L, a, b)` factor as a contiguous `(L, b, a)` right operand, for the CUDA kernel (CPU reads A and B
    in their stored layout: see `_rank_product` and `_output_product`)."""
    return weight.transpose(1, 2).contiguous()


def _output_product(hidden: torch.Tensor, lora_B: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`B[leaf] @ hidden` for rows sorted by leaf: `(T, out)`.

    On CPU B is read through a transposed view, in its stored layout. Unlike A's (CPU `grouped_mm` is up to 100
    times slower on it: 16 ms against 0.15 ms for 1024 rows, 16 leaves, 576 -> 8), that view costs the product
    nothing, while a copy of B costs more than the product at many leaves (measured, one thread, 1024 rows, 256
    leaves of rank 8 to 1536 features: 3.4 ms with the copy, 1.6 ms without; 0.47-0.93x at 16 leaves). The CUDA
    kernel keeps the copy: it is untested there without a GPU."""
    if hidden.device.type == "cpu":
        return F.grouped_mm(hidden, lora_B.transpose(1, 2), offs=ends)
    return F.grouped_mm(hidden, _transposed(lora_B), offs=ends)


def _rank_product(sorted_x: torch.Tensor, lora_A: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`A[leaf] @ x` for rows sorted by leaf: `(T, r)`.

    On CPU it is computed transposed, `A_k @ x_k.T` with the stacked A as the grouped left operand, which reads A in
    its stored layout: copying A into the right operand's layout costs more than the product once there are many
    leaves (measured at 256 leaves of 8 x 576: 1.5 ms for the copy, the whole kernel 9.2 ms before, 6.6 ms after).
    CUDA's kernel wants aligned output strides, which a `(r, T)` result has only for some T, so it keeps the copy."""
    if sorted_x.device.type == "cpu":
        # a fresh copy in row-major strides: `.contiguous()` keeps the unaligned strides of a one-row result
        return F.grouped_mm(lora_A, sorted_x.t(), offs=ends).t().clone(memory_format=torch.contiguous_format)
    return F.grouped_mm(sorted_x, _transposed(lora_A), offs=ends)


@torch.library.custom_op("peft_tree_lora::grouped_leaves", mutates_args=())
def grouped_leaves(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling * w[i] * B[leaf[i]] @ A[leaf[i]] @ x[i]` for every row `i` of `x` (`T, in`), with `w` the optional
    `row_weight` (`T`), applied in the rank space."""
    order, inverse, ends = _grouping(leaf, lora_A.shape[0])
    lora_A, lora_B = _pad(lora_A, lora_B)
    hidden = _rank_product(x.index_select(0, order), lora_A, ends)
    scale = _rank_scale(scaling, row_weight, order, hidden.dtype)
    if not (isinstance(scale, float) and scale == 1.0):
        hidden = hidden * scale
    return _output_product(hidden, lora_B, ends).index_select(0, inverse)


@grouped_leaves.register_fake
def _(x, lora_A, lora_B, leaf, scaling, row_weight=None):
    return x.new_empty(x.shape[0], lora_B.shape[1])


def _rank_scale(
    scaling: float, row_weight: torch.Tensor | None, order: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | float:
    """What the sorted rank activations are multiplied by: the scaling, times each row's weight if there is one."""
    if row_weight is None:
        return scaling
    return (row_weight.index_select(0, order) * scaling).to(dtype).unsqueeze(-1)


@torch.library.custom_op("peft_tree_lora::grouped_leaves_backward", mutates_args=())
def grouped_leaves_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    leaf: torch.Tensor,
    scaling: float,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `grouped_leaves` with respect to `x`, `lora_A`, `lora_B` and `row_weight` (empty without)."""
    rank = lora_A.shape[1]
    order, inverse, ends = _grouping(leaf, lora_A.shape[0])
    lora_A, lora_B = _pad(lora_A, lora_B)
    sorted_x = x.index_select(0, order)
    sorted_grad = grad.index_select(0, order)  # a new, dense tensor whatever the strides of `grad`
    scale = _rank_scale(scaling, row_weight, order, x.dtype)
    raw_hidden = _rank_product(sorted_x, lora_A, ends)  # (T, r), before any scaling
    grad_scaled_hidden = F.grouped_mm(sorted_grad, lora_B, offs=ends)  # (T, r)
    grad_B = F.grouped_mm(sorted_grad.t(), raw_hidden * scale, offs=ends)  # (L, out, r)
    grad_hidden = grad_scaled_hidden * scale
    grad_A = F.grouped_mm(grad_hidden.t(), sorted_x, offs=ends)  # (L, r, in)
    grad_x = F.grouped_mm(grad_hidden, lora_A, offs=ends).index_select(0, inverse)
    if row_weight is None:
        grad_row_weight = x.new_empty(0)
    else:
        grad_row_weight = ((grad_scaled_hidden * raw_hidden).sum(-1) * scaling).index_select(0, inverse)
        grad_row_weight = grad_row_weight.to(row_weight.dtype)
    return grad_x, grad_A[:, :rank].contiguous(), grad_B[..., :rank].contiguous(), grad_row_weight


@grouped_leaves_backward.register_fake
def _(grad, x, lora_A, lora_B, leaf, scaling, row_weight=None):
    grad_row_weight = x.new_empty(0) if row_weight is None else torch.empty_like(row_weight)
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), grad_row_weight


def _setup_context(ctx, inputs, output) -> None:
    x, lora_A, lora_B, leaf, scaling, row_weight = inputs
    ctx.save_for_backward(x, lora_A, lora_B, leaf, row_weight)
    ctx.scaling = scaling


def _backward(ctx, grad):
    x, lora_A, lora_B, leaf, row_weight = ctx.saved_tensors
    grads = grouped_leaves_backward(grad, x, lora_A, lora_B, leaf, ctx.scaling, row_weight)
    grad_x, grad_A, grad_B, grad_row_weight = grads
    return grad_x, grad_A, grad_B, None, None, None if row_weight is None else grad_row_weight


grouped_leaves.register_autograd(_backward, setup_context=_setup_context)


def grouped_leaves_usable(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs these operands on this device: float32 or bf16 on CPU, bf16 on CUDA GPUs of
    compute capability 9.0 or newer (its CUDA kernel's requirement), and feature widths it can align."""
    if not hasattr(F, "grouped_mm") or not (x.dtype == lora_A.dtype == lora_B.dtype):
        return False
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    else:
        return False
    align = _alignment(x.dtype)
    return x.shape[-1] % align == 0 and lora_B.shape[1] % align == 0
