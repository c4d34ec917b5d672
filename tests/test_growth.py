"""Growing a tree by one level (upcycling): `model.base_model.grow_tree()`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import PeftModel

from peft_tree_lora import TreeLoraLinear


@pytest.mark.parametrize("routing", ["token", "block", "sequence"])
@pytest.mark.parametrize("depth", [0, 2])
def test_growing_with_exact_copies_keeps_every_output(routing, depth, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=depth, routing=routing))
    model.eval()
    before = logits(model, input_ids)
    model.base_model.grow_tree(seed=0)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["token", "block"])
def test_a_grown_tree_is_one_level_deeper_everywhere_and_keeps_its_top_routes(routing, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing=routing))
    counts = model.base_model.parameter_counts()
    old_routes = model.base_model.leaf_routes(input_ids)
    model.base_model.grow_tree(seed=0)
    config = model.peft_config["default"]
    assert config.depth == 3
    layers = [m for m in model.modules() if isinstance(m, TreeLoraLinear)]
    assert all(m.treelora_A["default"].shape[0] == 8 == m.treelora_B["default"].shape[0] for m in layers)
    routed = [m for m in layers if "default" in m.treelora_router]  # block routing: each block's first module
    assert len(routed) == (len(layers) if routing == "token" else 2)
    assert all(m.treelora_router["default"].weight.shape[0] == 7 for m in routed)
    grown = model.base_model.parameter_counts()
    leaf_params = sum(m.treelora_A["default"].numel() + m.treelora_B["default"].numel() for m in layers)
    assert grown["total"] - counts["total"] == leaf_params // 2 + sum(4 * (m.in_features + 1) for m in routed)
    assert grown["active_per_token"] - counts["active_per_token"] == sum(m.in_features + 1 for m in routed)
    routes = model.base_model.leaf_routes(input_ids)
    assert routes.keys() == old_routes.keys()
    for name, leaf in routes.items():  # the old routers still decide the first two levels: leaf k became 2k or 2k+1
        assert torch.equal(leaf // 2, old_routes[name])
    assert any(bool((leaf % 2 == 0).any() and (leaf % 2 == 1).any()) for leaf in routes.values())


def test_the_old_routers_keep_their_weights_and_each_leaf_becomes_its_two_children():
    model = trained_looking(tree_model(make_tiny_llama(), depth=1))
    layer = next(m for m in model.modules() if isinstance(m, TreeLoraLinear))
    old_B, old_router = layer.treelora_B["default"].detach().clone(), layer.treelora_router["default"].weight.clone()
    model.base_model.grow_tree(seed=0)
    new_B, new_router = layer.treelora_B["default"], layer.treelora_router["default"].weight
    for leaf in range(2):
        assert torch.equal(new_B[2 * leaf], old_B[leaf]) and torch.equal(new_B[2 * leaf + 1], old_B[leaf])
    assert torch.equal(new_router[:1], old_router)


def test_noisy_copies_differ_by_about_the_asked_relative_noise():
    model = trained_looking(tree_model(make_tiny_llama(), depth=1))
    layer = next(m for m in model.modules() if isinstance(m, TreeLoraLinear))
    old_A = layer.treelora_A["default"].detach().clone()
    model.base_model.grow_tree(noise_std=0.1, seed=0)
    new_A = layer.treelora_A["default"].detach()
    relative = (new_A[0] - old_A[0]).pow(2).mean().sqrt() / old_A[0].pow(2).mean().sqrt()
    assert 0.07 < float(relative) < 0.13
    assert not torch.equal(new_A[0], new_A[1])


def test_a_grown_tree_trains_its_two_copies_apart(input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=0))
    model.base_model.grow_tree(seed=0)
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, TreeLoraLinear))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # identical copies give the new router no gradient until a step has set them apart
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    lora_B = layer.treelora_B["default"]
    assert not torch.allclose(lora_B[0], lora_B[1])
    assert layer.treelora_router["default"].weight.grad.abs().sum() > 0


def test_a_grown_adapter_saves_and_loads_back_with_its_new_depth(tmp_path, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=1))
    model.base_model.grow_tree(seed=0)
    model.eval()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].depth == 2
    torch.testing.assert_close(logits(loaded.eval(), input_ids), expected)


@pytest.mark.parametrize(
    ("config", "prepare", "message"),
    [
        ({"leaf_layout": "path", "depth": 2, "r": 6}, None, "leaf_layout='path'"),
        ({"depth": 10, "r": 1, "target_modules": ["q_proj"]}, None, "largest allowed"),
        ({"routing": "sequence"}, lambda m: m.base_model.pin_leaf(1), "pinned leaf"),
        ({"depth": 0}, lambda m: m.merge_adapter(), "merged"),
        ({}, "noise", "noise_std"),
    ],
    ids=["path-layout", "max-depth", "pinned", "merged", "bad-noise"],
)
def test_growing_is_refused_with_a_reason_and_leaves_the_model_as_it_was(config, prepare, message, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), **config))
    if callable(prepare):
        prepare(model)
    model.eval()
    before = logits(model, input_ids)
    with pytest.raises(ValueError, match=message):
        model.base_model.grow_tree(noise_std=-1.0 if prepare == "noise" else 0.0)
    assert model.peft_config["default"].depth == config.get("depth", 3)
    torch.testing.assert_close(logits(model, input_ids), before)
