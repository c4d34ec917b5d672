"""The fast kernels of TreeLoRA give the same outputs and gradients as straightforward reference code.

The references below are written for clarity, not speed: an explicit sum over leaves, a Python loop over rows, a
level-by-level descent over every router's logit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny_llama
from peft import get_peft_model

from benchmarks.tree_lora_bench import configure_parser, run
from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.tuner import TreeRouter, grouped, leaves, routing

IN, OUT, RANK = 24, 40, 4
SCALING = 1.5


def reference_mix(x, lora_A, lora_B, weights, scaling):
    return scaling * sum(weights[..., k : k + 1] * (x @ lora_A[k].T @ lora_B[k].T) for k in range(lora_A.shape[0]))


def reference_per_row(x, lora_A, lora_B, leaf, scaling):
    rows = [scaling * lora_B[k] @ (lora_A[k] @ x[i]) for i, k in enumerate(leaf.tolist())]
    return torch.stack(rows) if rows else x.new_zeros(0, lora_B.shape[1])


def reference_descent(logits, depth):
    """Walk the tree one level at a time: right (2n+2) where the node's logit is >= 0, else left (2n+1)."""
    leaves_out = []
    for row in logits.flatten(0, -2).tolist():
        node = 0
        for _ in range(depth):
            node = 2 * node + (2 if row[node] >= 0 else 1)
        leaves_out.append(node - (2**depth - 1))
    return torch.tensor(leaves_out, dtype=torch.long).view(logits.shape[:-1])


def leaf_tensors(depth, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    num_leaves = 2**depth
    lora_A = torch.randn(num_leaves, RANK, IN, generator=generator).requires_grad_(requires_grad)
    lora_B = torch.randn(num_leaves, OUT, RANK, generator=generator).requires_grad_(requires_grad)
    return lora_A, lora_B


def some_leaves(rows, depth, seed=0):
    """Leaf choices that leave some leaves unused (every other leaf when there are several)."""
    generator = torch.Generator().manual_seed(seed)
    num_leaves = 2**depth
    step = 2 if num_leaves > 2 else 1
    return torch.randint(0, num_leaves // step, (rows,), generator=generator) * step


HARD_KERNELS = {
    "dispatcher": leaves.apply_leaf_per_row,
    "gathered": leaves.gathered,
    "masked_dense": leaves.masked_dense,
    "grouped_by_loop": leaves.grouped_by_loop,
    "grouped": leaves.grouped,
}


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_soft_mix_equals_weighted_sum_of_every_leaf_in_output_and_gradients(depth):
    lora_A, lora_B = leaf_tensors(depth, requires_grad=True)
    x = torch.randn(2, 7, IN, requires_grad=True)
    weights = torch.softmax(torch.randn(2, 7, 2**depth), dim=-1).requires_grad_(True)
    fast = leaves.mix_leaves(x, lora_A, lora_B, weights, SCALING)
    slow = reference_mix(x, lora_A, lora_B, weights, SCALING)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(slow)
    fast_grads = torch.autograd.grad(fast, (x, lora_A, lora_B, weights), upstream)
    slow_grads = torch.autograd.grad(slow, (x, lora_A, lora_B, weights), upstream)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", list(HARD_KERNELS))
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_hard_kernel_applies_only_each_rows_leaf(kernel, depth, rows):
    if kernel == "grouped" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    lora_A, lora_B = leaf_tensors(depth)
    x = torch.randn(rows, IN)
    leaf = some_leaves(rows, depth)
    with torch.inference_mode():
        fast = HARD_KERNELS[kernel](x, lora_A, lora_B, leaf, SCALING)
    torch.testing.assert_close(fast, reference_per_row(x, lora_A, lora_B, leaf, SCALING), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", list(HARD_KERNELS))
@pytest.mark.parametrize("depth", [0, 1, 4])
@pytest.mark.parametrize("rows", [3, 200])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "row-weighted"])
def test_hard_kernel_output_and_gradients_match_reference(kernel, depth, rows, weighted):
    """With a weight per row (switch training's path probability) too: the output is the row's leaf times its
    weight, and the weight gets its gradient."""
    if kernel == "grouped" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    lora_A, lora_B = leaf_tensors(depth, requires_grad=True)
    x = torch.randn(rows, IN, requires_grad=True)
    leaf = some_leaves(rows, depth)
    row_weight = torch.rand(rows, requires_grad=True) if weighted else None
    inputs = (x, lora_A, lora_B) + ((row_weight,) if weighted else ())
    fast = HARD_KERNELS[kernel](x, lora_A, lora_B, leaf, SCALING, row_weight)
    slow = reference_per_row(x, lora_A, lora_B, leaf, SCALING)
    if weighted:
        slow = slow * row_weight.unsqueeze(-1)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(slow)
    for fast_grad, slow_grad in zip(
        torch.autograd.grad(fast, inputs, upstream), torch.autograd.grad(slow, inputs, upstream)
    ):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


def test_grouped_kernel_is_not_used_where_grouped_mm_cannot_run():
    lora_A, lora_B = leaf_tensors(2)
    x = torch.randn(10, IN)
    assert grouped.grouped_leaves_usable(x, lora_A, lora_B)
    assert grouped.grouped_leaves_usable(x, lora_A.requires_grad_(True), lora_B)  # it has a backward
    assert grouped.grouped_leaves_usable(x.bfloat16(), lora_A.detach().bfloat16(), lora_B.bfloat16())
    assert not grouped.grouped_leaves_usable(x.double(), lora_A.detach().double(), lora_B.double())
    assert not grouped.grouped_leaves_usable(torch.randn(10, 6), torch.randn(4, 3, 6), torch.randn(4, 8, 3))  # width 6


@pytest.mark.parametrize("rank", [1, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_takes_any_rank_and_both_cpu_dtypes(rank, dtype):
    """Ranks that are not a multiple of the alignment are padded inside the kernel; the result is unchanged."""
    generator = torch.Generator().manual_seed(rank)
    lora_A = torch.randn(8, rank, 16, generator=generator).to(dtype).requires_grad_(True)
    lora_B = torch.randn(8, 24, rank, generator=generator).to(dtype).requires_grad_(True)
    x = torch.randn(50, 16, generator=generator).to(dtype).requires_grad_(True)
    leaf = some_leaves(50, 3)
    fast = leaves.grouped(x, lora_A, lora_B, leaf, SCALING)
    slow = reference_per_row(x.float(), lora_A.float(), lora_B.float(), leaf, SCALING)
    close_enough(fast, slow, dtype)
    upstream = torch.randn(slow.shape, generator=generator)
    fast_grads = torch.autograd.grad(fast, (x, lora_A, lora_B), upstream.to(dtype))
    slow_grads = torch.autograd.grad(slow, (x, lora_A, lora_B), upstream)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        assert fast_grad.shape == slow_grad.shape
        close_enough(fast_grad, slow_grad, dtype)


def close_enough(fast, slow, dtype):
    """float32 to rounding; bf16 (8 bits of mantissa) to 2% of the largest entry."""
    slow = slow.float()
    if dtype == torch.float32:
        torch.testing.assert_close(fast.float(), slow, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(fast.float(), slow, rtol=2e-2, atol=2e-2 * slow.abs().max().item())


def test_grouped_kernel_passes_torch_library_opcheck():
    """The operator's fake (meta) implementation, autograd registration and schema agree with what it computes, so
    `torch.compile` can trace it as one node."""
    lora_A, lora_B = leaf_tensors(3, requires_grad=True)
    x = torch.randn(30, IN, requires_grad=True)
    torch.library.opcheck(grouped.grouped_leaves, (x, lora_A, lora_B, some_leaves(30, 3), SCALING))
    row_weight = torch.rand(30, requires_grad=True)
    torch.library.opcheck(grouped.grouped_leaves, (x, lora_A, lora_B, some_leaves(30, 3), SCALING, row_weight))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_mix_gradient_equals_the_gradient_of_adding_and_subtracting_the_soft_mix(per_sequence):
    """The straight-through estimate: the served value, unchanged, with the routers' gradient of the soft mix."""
    lora_A, lora_B = leaf_tensors(3)
    x = torch.randn(4, 6, IN) if per_sequence else torch.randn(24, IN)
    weights = torch.softmax(torch.randn(x.shape[0], 8), dim=-1).requires_grad_(True)
    served = torch.randn(x.shape[:-1] + (OUT,), requires_grad=True)
    fast = leaves.with_mix_gradient(served, weights, x, lora_A, lora_B, SCALING)
    mix = leaves.mix_leaves(x, lora_A, lora_B, weights.unsqueeze(1) if per_sequence else weights, SCALING)
    slow = served + (mix - mix.detach())
    assert torch.equal(fast, served)
    upstream = torch.randn_like(slow)
    for fast_grad, slow_grad in zip(
        torch.autograd.grad(fast, (served, weights), upstream), torch.autograd.grad(slow, (served, weights), upstream)
    ):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sequence-weighted"])
def test_per_sequence_kernel_applies_each_sequences_leaf(depth, weighted):
    lora_A, lora_B = leaf_tensors(depth)
    x = torch.randn(4, 6, IN)
    leaf = some_leaves(4, depth)
    row_weight = torch.rand(4, requires_grad=True) if weighted else None
    fast = leaves.apply_leaf_per_sequence(x, lora_A, lora_B, leaf, SCALING, row_weight)
    slow = torch.stack([SCALING * x[b] @ lora_A[k].T @ lora_B[k].T for b, k in enumerate(leaf.tolist())])
    if weighted:
        slow = slow * row_weight.view(4, 1, 1)
        upstream = torch.randn_like(slow)
        (fast_grad,), (slow_grad,) = (torch.autograd.grad(y, (row_weight,), upstream) for y in (fast, slow))
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_descend_logits_goes_right_exactly_where_the_logit_is_non_negative(depth):
    generator = torch.Generator().manual_seed(depth)
    logits = torch.randint(-2, 3, (50, 2**depth - 1), generator=generator).float()  # many exact zeros
    assert torch.equal(routing.descend_logits(logits, depth), reference_descent(logits, depth))
    assert torch.equal(routing.descend_logits(torch.zeros(3, 2**depth - 1), depth), torch.full((3,), 2**depth - 1))


@pytest.mark.parametrize("depth", [0, 1, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows", [4, 300])
def test_descent_through_routers_matches_full_logit_descent(depth, rows):
    """Integer-valued inputs and routers make every logit exact, so split and full evaluation must agree exactly,
    ties at zero included."""
    generator = torch.Generator().manual_seed(rows + depth)
    x = torch.randint(-2, 3, (rows, IN), generator=generator).float()
    weight = torch.randint(-2, 3, (2**depth - 1, IN), generator=generator).float()
    bias = torch.randint(-2, 3, (2**depth - 1,), generator=generator).float()
    expected = reference_descent(x @ weight.T + bias, depth)
    assert torch.equal(routing.descend(x, weight, bias, depth), expected)


@pytest.mark.parametrize("input_norm", [False, True])
@pytest.mark.parametrize("shape", [(9,), (2, 5), (700,)], ids=["rows", "batch-tokens", "padded-to-16-routers"])
def test_router_logits_equal_a_plain_linear_layer_on_the_optionally_normalised_input(input_norm, shape):
    x, weight, bias = 0.3 * torch.randn(*shape, IN), torch.randn(15, IN), torch.randn(15)
    routing_input = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() if input_norm else x
    expected = routing_input @ weight.T + bias
    torch.testing.assert_close(routing.router_logits(x, weight, bias, input_norm), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 4, 6])
def test_a_routers_hard_leaf_is_the_descent_of_its_own_logits(depth):
    """Serving (`leaf`) and training (logits, then descent) must pick the same leaf for every row."""
    router = TreeRouter(IN, depth)
    x = torch.randn(300, IN)
    assert torch.equal(router.leaf(x), routing.descend_logits(router(x), depth))
    assert torch.equal(router.leaf(x[:3]), routing.descend_logits(router(x[:3]), depth))


def simple_kernels(monkeypatch):
    """Route every hard call through the plainest kernels: no gather, no grouped_mm, no split descent."""
    monkeypatch.setattr(leaves, "USE_GROUPED_MM", False)
    monkeypatch.setattr(leaves, "GATHER_MAX_ROWS", 0)
    monkeypatch.setattr(leaves, "MASKED_DENSE_MAX_LEAVES", 0)
    monkeypatch.setattr(routing, "SPLIT_DESCENT_MIN_ROW_ROUTERS", float("inf"))


@pytest.mark.parametrize("routing_mode", ["token", "sequence"])
@pytest.mark.parametrize("depth", [1, 2, 6])
@pytest.mark.parametrize("batch", [(1, 3), (4, 40)])
def test_model_outputs_are_the_same_with_fast_and_simple_kernels(monkeypatch, routing_mode, depth, batch):
    config = TreeLoraConfig(
        depth=depth, r=4, routing=routing_mode, target_modules="all-linear", init_lora_weights=False
    )
    model = get_peft_model(make_tiny_llama(), config).eval()
    input_ids = torch.randint(3, VOCAB, batch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = model(input_ids=input_ids).logits
        routes = model.base_model.leaf_routes(input_ids)
    simple_kernels(monkeypatch)
    with torch.inference_mode():
        simple = model(input_ids=input_ids).logits
        simple_routes = model.base_model.leaf_routes(input_ids)
    torch.testing.assert_close(fast, simple, rtol=1e-4, atol=1e-4)
    assert routes.keys() == simple_routes.keys()
    for name in routes:
        assert torch.equal(routes[name], simple_routes[name]), name


def test_benchmark_smoke_run_writes_report_and_plot(tmp_path):
    import argparse

    args = configure_parser(argparse.ArgumentParser()).parse_args(
        [
            "--tiny",
            "--sections",
            "forward",
            "--rounds",
            "1",
            "--depths",
            "0,1",
            "--no-xlora",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert run(args) == 0
    report = (tmp_path / "results.md").read_text()
    assert "| eval forward | LoRA r=8 |" in report and "TreeLoRA d=1 sequence" in report
    assert (tmp_path / "bench_depth.png").read_bytes()[:4] == b"\x89PNG"
