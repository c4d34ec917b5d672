"""The maths of a binary routing tree: path probabilities, hard descent, auxiliary losses.

Nodes are kept in heap order: node `n` has its left child at `2n+1` (taken when `p < 0.5`) and its right child at
`2n+2` (taken when `p >= 0.5`). A tree of depth `d` has `2**d - 1` nodes and `2**d` leaves; leaf `k` is the leaf
whose path, read from the root, spells `k` in binary with 1 meaning "right". Nothing here knows about LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .leaves import grouped_mm_usable

# Up to this depth a hard descent evaluates every router in one matmul: (2**d - 1) dot products per row, which for
# d <= 4 (15 routers) costs less than the operations a cleverer descent would add.
FULL_ROUTER_EVAL_MAX_DEPTH = 4
# Deeper trees split in two: the top half of the tree is evaluated in full, then each row evaluates only the routers
# of the subtree it fell into (about 2 * 2**(d/2) dot products instead of 2**d). Below this many rows x routers the
# full evaluation is cheaper than the split's fixed cost (a few dozen microseconds).
SPLIT_DESCENT_MIN_ROW_ROUTERS = 4096


# Padding the routers costs two small copies per call: only worth it for inputs this large (about 32 rows of 576).
PAD_ROUTERS_MIN_ELEMENTS = 2**14
# Up to this depth the descent reads each row's leaf from a table indexed by the signs of all its router logits
# (2**(2**d - 1) entries: 32768 at depth 4): five operations whatever the depth, against two per level.
SIGN_TABLE_MAX_DEPTH = 4


def num_nodes(depth: int) -> int:
    return 2**depth - 1


def num_leaves(depth: int) -> int:
    return 2**depth


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
    if depth == 0:
        return torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    nodes = num_nodes(depth)
    if logits.shape[-1] != nodes:
        logits = logits[..., :nodes]
    if depth <= SIGN_TABLE_MAX_DEPTH:
        if logits.dtype == torch.float32:  # one operation for both the comparison and the cast
            signs = torch.heaviside(logits, _constant(1.0, logits))
        else:
            signs = (logits >= 0).to(torch.float32)
        table = _leaf_table(depth, logits.device)
        if signs.dim() == 2:  # the common case, in as few operations as it takes (decoding is dispatch-bound)
            return table.index_select(0, torch.mv(signs, _sign_weights(depth, logits.device)).long())
        code = F.linear(signs, _sign_weights(depth, logits.device).unsqueeze(0)).squeeze(-1)  # exact: <= 15 bits
        return table.index_select(0, code.long().flatten()).view(code.shape)
    # the child of node n is 2n + step, with step 1 (left) or 2 (right): two operations per level
    step = (logits >= 0).long().add_(1)
    node = step[..., :1]
    for _ in range(1, depth):
        node = torch.add(step.gather(-1, node), node, alpha=2)
    return node.squeeze(-1) - nodes


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, input_norm: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """`x @ weight.T + bias` (`..., nodes`), or with `input_norm` the same for `x` divided by its root mean square
    (`x * rsqrt(mean(x**2) + eps)`), computed as `(x @ weight.T) / rms(x) + bias`: the same function in fewer
    operations, since the few rows of a decoding step make this part cost what its operations cost, not its FLOPs.

    Large inputs use `weight` padded to a multiple of 8 rows: CPU BLAS kernels are about three times slower for 15
    or 31 output columns than for 16 or 32 (measured on the benchmark machine), and a tree has `2**d - 1` routers:
    one zero row restores the fast width. The returned tensor is then a view of the first `nodes` columns.

    Autocast is switched off here: in bf16 the routers' decisions near 0.5 and the load-balance loss lose most of
    their precision (measured: the load-balance term of a depth-2 tree went from 0.00483 to 0.00446, and to a
    negative KL under sequence routing), while the routers cost a few dot products per token.
    """
    nodes = weight.shape[0]
    padding = -nodes % 8 if nodes >= 7 and x.numel() >= PAD_ROUTERS_MIN_ELEMENTS else 0
    if padding:
        weight = F.pad(weight, (0, 0, 0, padding))
        bias = F.pad(bias, (0, padding))
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = _logits(x.to(weight.dtype), weight, bias, input_norm, eps)
    else:
        logits = _logits(x.to(weight.dtype), weight, bias, input_norm, eps)
    return logits[..., :nodes] if padding else logits


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, input_norm: bool, eps: float) -> torch.Tensor:
    if not input_norm:
        return F.linear(x, weight, bias)
    return _scaled_logits(F.linear(x, weight), _inverse_rms(x, eps), bias)


def descend(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, depth: int, input_norm: bool = False
) -> torch.Tensor:
    """Hard leaf index for each row of `x` (`T, in`) through routers `weight` (`2**d - 1, in`) and `bias`, reading
    `x` divided by its RMS when `input_norm`. No gradient flows through a hard decision.

    Small trees evaluate every router in one matmul. Deep trees evaluate the top `ceil(d/2)` levels in full, then
    each row evaluates only the routers of its subtree (one grouped matmul over rows sorted by subtree), so the
    router cost grows like `2**(d/2)`, not `2**d`.
    """
    rows = x.shape[0]
    if depth == 0:
        return torch.zeros(rows, dtype=torch.long, device=x.device)
    split = (
        depth > FULL_ROUTER_EVAL_MAX_DEPTH
        and rows * weight.shape[0] >= SPLIT_DESCENT_MIN_ROW_ROUTERS
        and grouped_mm_usable(x, weight)
    )
    if not split:
        return descend_logits(router_logits(x, weight, bias, input_norm), depth)
    # the RMS divides the logits, not the input: one pass over x instead of a normalised copy of it
    inverse_rms = _inverse_rms(x) if input_norm else None
    top = (depth + 1) // 2
    # rows 0..15 hold the top 15 routers and one more: an extra column that descend_logits never reads (fast width)
    top_rows = 2**top
    top_logits = F.linear(x, weight[:top_rows])
    subtree = descend_logits(_scaled_logits(top_logits, inverse_rms, bias[:top_rows]), top)
    nodes = subtree_nodes(top, depth - top, weight.device)  # (2**top, 2**(d-top)) heap indices, last one a filler
    order = torch.argsort(subtree)
    ends = torch.bincount(subtree, minlength=nodes.shape[0]).cumsum(0, dtype=torch.int32)
    # transposed, with the gathered routers as the left operand: grouped_mm reads them in their stored layout
    sorted_logits = F.grouped_mm(weight[nodes], x.index_select(0, order).t(), offs=ends).t()
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=order.device))
    bias_of_rows = bias[nodes].index_select(0, subtree)
    logits = _scaled_logits(sorted_logits.index_select(0, inverse), inverse_rms, bias_of_rows)
    return subtree * 2 ** (depth - top) + descend_logits(logits, depth - top)


def _inverse_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`1 / rms(x)` over the last dimension, `(..., 1)`: what normalising `x` by its RMS multiplies it by.

    Through the vector norm: one fused reduction, where `vecdot(x, x)` and `x.pow(2).sum()` run as a product and a
    sum (measured on CPU, 1024 rows of 576: 140 us against 360 us)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(_constant(eps, norm), norm, norm, value=1.0 / x.shape[-1]).rsqrt_()


def _scaled_logits(products: torch.Tensor, inverse_rms: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """`products / rms + bias`, the logits of RMS-normalised inputs from the products with the raw ones."""
    return products + bias if inverse_rms is None else torch.addcmul(bias, products, inverse_rms)


_SIGN_TABLES: dict[tuple[str, int, torch.device], torch.Tensor] = {}
_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 0-d tensor of `like`'s dtype and device, made once: operators such as `addcmul` and
    `heaviside` take a tensor where a Python number would cost a conversion on every call."""
    if torch.compiler.is_compiling():  # a graph constant there; nothing traced may land in the cache
        return torch.full((), value, dtype=like.dtype, device=like.device)
    key = (value, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def _sign_weights(depth: int, device: torch.device) -> torch.Tensor:
    """`(2**d - 1,)` powers of two: node `n`'s sign is bit `n` of a row's code."""
    key = ("weights", depth, device)
    if key not in _SIGN_TABLES:
        _SIGN_TABLES[key] = (2.0 ** torch.arange(num_nodes(depth))).to(device)
    return _SIGN_TABLES[key]


def _leaf_table(depth: int, device: torch.device) -> torch.Tensor:
    """The leaf reached for every sign code (see `_sign_weights`), found by walking the tree level by level."""
    key = ("leaves", depth, device)
    if key not in _SIGN_TABLES:
        nodes = num_nodes(depth)
        code = torch.arange(2**nodes)
        node = torch.zeros_like(code)
        for _ in range(depth):
            right = (code >> node) & 1
            node = 2 * node + 1 + right
        _SIGN_TABLES[key] = (node - nodes).to(device)
    return _SIGN_TABLES[key]


_SUBTREE_NODES: dict[tuple[int, int, str], torch.Tensor] = {}


def subtree_nodes(top: int, below: int, device: torch.device) -> torch.Tensor:
    """Heap indices of the routers of each subtree hanging below level `top`: row `s` lists, in the subtree's own
    heap order, the `2**below - 1` routers of the subtree whose root is node `2**top - 1 + s`, then node 0 as a
    filler column that keeps the grouped matmul at an even width (its logit is never read)."""
    key = (top, below, str(device))
    if key not in _SUBTREE_NODES:
        subtree = torch.arange(2**top).unsqueeze(1)
        levels = [2 ** (top + j) - 1 + subtree * 2**j + torch.arange(2**j) for j in range(below)]
        filler = torch.zeros_like(subtree)
        _SUBTREE_NODES[key] = torch.cat(levels + [filler], dim=1).to(device)
    return _SUBTREE_NODES[key]


def hardening_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Bernoulli entropy, in bits, of the router decisions: 1 when every `p` is 0.5, 0 when all are 0 or 1."""
    entropy = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="mean")
    return entropy / math.log(2)


def load_balance_loss(leaf_weights: torch.Tensor) -> torch.Tensor:
    """KL divergence (nats) of the mean leaf usage from uniform: 0 when every leaf carries the same share."""
    num_leaves = leaf_weights.shape[-1]
    usage = leaf_weights.reshape(-1, num_leaves).mean(0)
    return (usage * torch.log(usage.clamp_min(1e-12) * num_leaves)).sum()


def switch_balance_loss(leaf_weights: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's balance loss, shifted to 0 at balance: `L * sum_k f_k P_k - 1`, where `f_k` is the share
    of rows whose hard route is leaf `k` (no gradient) and `P_k` the mean path probability of leaf `k`. Unlike the
    KL of the soft usage, it also penalises a tree whose hard choices crowd into a few leaves while its soft weights
    look even."""
    num_leaves = leaf_weights.shape[-1]
    weights = leaf_weights.reshape(-1, num_leaves)
    share = F.one_hot(leaf.reshape(-1), num_leaves).to(weights.dtype).mean(0)  # no host sync, unlike bincount
    return num_leaves * (share * weights.mean(0)).sum() - 1.0


def path_prob_of_leaf(logits: torch.Tensor, leaf: torch.Tensor, depth: int) -> torch.Tensor:
    """The path probability (`...`) of the given `leaf` (`...`) under router `logits` (`..., 2**d - 1`): the product,
    over the `depth` nodes on its path, of `p` where the path goes right and `1 - p` where it goes left. Reads
    `depth` logits per row instead of building every leaf's weight."""
    levels = torch.arange(depth, device=leaf.device)
    prefix = leaf.unsqueeze(-1) >> (depth - levels)  # the path's node at each level, counted within its level
    nodes = prefix + (2**levels - 1)
    right = ((leaf.unsqueeze(-1) >> (depth - 1 - levels)) & 1).bool()
    chosen = logits.gather(-1, nodes)
    return F.logsigmoid(torch.where(right, chosen, -chosen)).sum(-1).exp()


@dataclass(frozen=True)
class RouterLosses:
    """The weighted auxiliary losses of one tree. The weights are per tree: a model with 200 trees puts the same
    pressure on each of them as a model with one (their sum is what training adds to the loss)."""

    depth: int
    hardening_weight: float = 0.0
    balance_weight: float = 0.0
    balance: str = "kl"  # "kl": KL of the soft usage from uniform; "switch": Switch Transformer's f * P

    def __call__(self, logits: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor | None:
        if not (self.hardening_weight or self.balance_weight):
            return None
        total = logits.new_zeros(())
        if self.hardening_weight:
            total = total + self.hardening_weight * hardening_loss(logits)
        if self.balance_weight:
            weights = path_probs(torch.sigmoid(logits), self.depth)
            balance = switch_balance_loss(weights, leaf) if self.balance == "switch" else load_balance_loss(weights)
            total = total + self.balance_weight * balance
        return total


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
