"""The tree maths: heap order, path probabilities, hard descent and the auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch

from peft_tree_lora.tuner.routing import descend, descend_logits, hardening_loss, load_balance_loss, path_probs

DEPTHS = [1, 2, 4, 7]


@pytest.mark.parametrize("depth", DEPTHS)
def test_leaf_weights_of_every_row_sum_to_one(depth):
    p = torch.rand(50, 2**depth - 1)
    torch.testing.assert_close(path_probs(p, depth).sum(-1), torch.ones(50))


def test_leaf_weight_is_the_product_along_its_heap_order_path():
    # depth 2: root 0; its children 1 (left) and 2 (right); leaf k spells its path in binary, 1 = right
    p = torch.tensor([[0.3, 0.6, 0.9]])
    expected = torch.tensor([[0.7 * 0.4, 0.7 * 0.6, 0.3 * 0.1, 0.3 * 0.9]])
    torch.testing.assert_close(path_probs(p, 2), expected)


@pytest.mark.parametrize("depth", DEPTHS)
def test_hard_descent_takes_the_leaf_that_saturated_routers_give_all_weight_to(depth):
    logits = torch.randn(64, 2**depth - 1).sign() * (40 + 40 * torch.rand(64, 2**depth - 1))
    weights = path_probs(torch.sigmoid(logits), depth)
    assert torch.equal(descend_logits(logits, depth), weights.argmax(-1))


def test_descent_goes_right_when_the_logit_is_exactly_zero():
    assert descend_logits(torch.zeros(1, 7), 3).item() == 7


@pytest.mark.parametrize("depth", [2, 6, 8])
@pytest.mark.parametrize("rows", [40, 600], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("input_norm", [False, True], ids=["raw", "rms-normalised"])
def test_descent_through_routers_matches_descent_through_all_logits(depth, rows, input_norm):
    """Deep trees over many rows take the split descent (each row evaluates only its subtree's routers)."""
    x = torch.randn(rows, 16) * 0.3
    weight, bias = torch.randn(2**depth - 1, 16), torch.randn(2**depth - 1)
    inputs = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) if input_norm else x
    logits = inputs @ weight.T + bias
    assert torch.equal(descend(x, weight, bias, depth, input_norm), descend_logits(logits, depth))


def test_hardening_loss_is_one_bit_at_half_and_zero_when_saturated():
    assert hardening_loss(torch.zeros(10, 3)).item() == pytest.approx(1.0)
    assert hardening_loss(torch.full((10, 3), 60.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_load_balance_loss_is_zero_for_even_use_and_log_leaves_for_collapse():
    even = torch.full((8, 4), 0.25)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 1.0
    assert load_balance_loss(even).item() == pytest.approx(0.0, abs=1e-7)
    assert load_balance_loss(collapsed).item() == pytest.approx(math.log(4), rel=1e-5)


def test_auxiliary_losses_have_finite_gradients_at_saturation():
    logits = torch.tensor([[80.0, -80.0, 0.5]], requires_grad=True)
    (hardening_loss(logits) + load_balance_loss(path_probs(torch.sigmoid(logits), 2))).backward()
    assert torch.isfinite(logits.grad).all()
