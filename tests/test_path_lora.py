"""Path (node) LoRA, `leaf_layout="path"`: every node on a token's path carries a LoRA; a token applies their sum."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from peft_tree_lora import TreeLoraConfig, TreeLoraLinear, TreeLoraSequenceRouter
from peft_tree_lora.experiments import capacity
from peft_tree_lora.integrations.export import export_leaf, run
from peft_tree_lora.integrations.hub.card import card_section, summarize_adapter

IN, OUT = 16, 12


def path_layer(depth: int, r: int, path_node_rank: int | None = None, seed: int = 0) -> TreeLoraLinear:
    """One token-routed path-layout layer on a Linear, every B random so that every node changes the output."""
    torch.manual_seed(seed)
    config = TreeLoraConfig(
        depth=depth,
        r=r,
        lora_alpha=2 * r,
        leaf_layout="path",
        path_node_rank=path_node_rank,
        routing="token",
        init_lora_weights=False,
        target_modules=["x"],
    )
    return TreeLoraLinear(nn.Linear(IN, OUT), "default", config, "x")


def ancestors(leaf: int, depth: int) -> list[int]:
    """Heap indices of the inner nodes above `leaf`, root first, by walking up from the leaf's heap index."""
    node, path = leaf + 2**depth - 1, []
    while node > 0:
        node = (node - 1) // 2
        path.append(node)
    return path[::-1]


def leaves_of(layer: TreeLoraLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.treelora_router["default"].leaf_and_logits(x, False)[0]


@pytest.mark.parametrize("training", [False, True], ids=["served", "hard-training"])
@pytest.mark.parametrize(("depth", "r", "node_rank"), [(1, 2, None), (2, 7, None), (3, 8, None), (2, 8, 3)])
def test_path_output_is_the_sum_of_the_path_nodes_loras_computed_by_hand(depth, r, node_rank, training):
    layer = path_layer(depth, r, node_rank).train(training)
    x = torch.randn(64, IN, generator=torch.Generator().manual_seed(1))
    delta = layer(x) - layer.get_base_layer()(x)
    node_A, node_B = layer.treelora_node_A["default"], layer.treelora_node_B["default"]
    leaf_A, leaf_B = layer.treelora_A["default"], layer.treelora_B["default"]
    scaling = 2 * r / r
    expected = torch.zeros_like(delta)
    for i, k in enumerate(leaves_of(layer, x).tolist()):
        total = leaf_B[k] @ (leaf_A[k] @ x[i])
        for n in ancestors(k, depth):
            total = total + node_B[n] @ (node_A[n] @ x[i])
        expected[i] = scaling * total
    assert torch.allclose(delta, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("r", "depth", "node_rank", "split"), [(8, 3, None, (2, 2)), (7, 2, None, (2, 3)), (8, 3, 1, (1, 5))]
)
def test_the_rank_splits_over_the_path_with_the_remainder_on_the_leaf(r, depth, node_rank, split):
    config = TreeLoraConfig(depth=depth, r=r, leaf_layout="path", path_node_rank=node_rank)
    assert config.path_ranks() == split
    layer = path_layer(depth, r, node_rank)
    assert layer.treelora_node_A["default"].shape == (2**depth - 1, split[0], IN)
    assert layer.treelora_B["default"].shape == (2**depth, OUT, split[1])
    assert layer.leaf_factors("default")[0].shape == (2**depth, r, IN)  # a token applies rank r in all


@pytest.mark.parametrize("leaf", range(4))
def test_hard_training_trains_exactly_the_nodes_on_the_path_of_the_routed_tokens(leaf):
    depth = 2
    layer = path_layer(depth, 3).train()
    x = torch.randn(400, IN, generator=torch.Generator().manual_seed(2))
    rows = x[leaves_of(layer, x) == leaf]
    assert rows.shape[0] > 0, "every leaf needs tokens for this test"
    layer(rows).sum().backward()
    on_path = set(ancestors(leaf, depth))
    for n in range(2**depth - 1):
        grads = (layer.treelora_node_A["default"].grad[n], layer.treelora_node_B["default"].grad[n])
        assert all((g.abs().sum() > 0) == (n in on_path) for g in grads), f"node {n}"
    assert 0 in on_path  # the root learns from the tokens of every leaf
    for k in range(2**depth):
        grads = (layer.treelora_A["default"].grad[k], layer.treelora_B["default"].grad[k])
        assert all((g.abs().sum() > 0) == (k == leaf) for g in grads), f"leaf {k}"


def path_tree(routing: str, depth: int = 2, r: int = 6) -> PeftModel:
    model = tree_model(make_tiny_llama(), depth=depth, r=r, leaf_layout="path", routing=routing)
    model = trained_looking(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraLinear):
                for node_B in module.treelora_node_B.values():
                    node_B.copy_(torch.randn(node_B.shape, generator=generator) * 0.5)
            if isinstance(module, TreeLoraSequenceRouter):  # tiny embeddings: let the prompts, not the bias, decide
                for router in module.treelora_router.values():
                    router.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("routing", ["token", "block", "sequence"])
def test_save_and_load_give_bit_identical_logits(routing, tmp_path, input_ids):
    model = path_tree(routing)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(key.endswith("treelora_node_A") for key in saved) and any(
        key.endswith("treelora_node_B") for key in saved
    )
    loaded = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path)).eval()
    assert loaded.peft_config["default"].leaf_layout == "path"
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def spread_prompts() -> torch.Tensor:
    return torch.arange(3, 19).unsqueeze(1).repeat(1, 8)


def test_an_exported_leaf_is_the_rank_r_lora_of_its_whole_path_and_equals_the_tree_on_that_leaf(tmp_path):
    model = path_tree("sequence")
    prompts = spread_prompts()
    routes = model.base_model.leaf_routes(prompts)["sequence"]
    tree_logits = logits(model, prompts)
    assert len(set(routes.tolist())) > 1
    for leaf in range(4):
        directory = export_leaf(model, leaf, tmp_path / f"leaf_{leaf}")
        plain = PeftModel.from_pretrained(make_tiny_llama(), str(directory)).eval()
        assert plain.peft_config["default"].r == 6
        rows = routes == leaf
        with model.base_model.pinned_leaf(leaf):
            pinned = logits(model, prompts)
        assert torch.allclose(logits(plain, prompts), pinned, atol=1e-5)
        assert torch.allclose(logits(plain, prompts)[rows], tree_logits[rows], atol=1e-5)


def test_the_command_line_exports_the_same_path_leaves_from_a_saved_directory(tmp_path):
    model = path_tree("sequence")
    model.save_pretrained(tmp_path / "tree")
    run(argparse.Namespace(adapter=str(tmp_path / "tree"), out=str(tmp_path / "all"), leaf=None))
    for leaf in range(4):
        from_model = load_file(str(export_leaf(model, leaf, tmp_path / f"m{leaf}") / "adapter_model.safetensors"))
        from_files = load_file(str(tmp_path / "all" / f"leaf_{leaf}" / "adapter_model.safetensors"))
        assert from_files.keys() == from_model.keys()
        assert all(torch.equal(from_files[key], from_model[key]) for key in from_model)
        assert all(value.shape[0 if key.endswith("lora_A.weight") else 1] == 6 for key, value in from_files.items())


def test_merging_a_pinned_path_leaf_gives_the_tree_on_that_leaf(input_ids):
    model = path_tree("sequence")
    with model.base_model.pinned_leaf(3):
        pinned = logits(model, input_ids)
        merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, input_ids), pinned, atol=1e-5)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_parameter_counts_and_the_card_match_a_hand_count(routing, tmp_path):
    depth, r = 2, 6  # inner nodes rank 2, leaves rank 2: a token applies 2 + 2 + 2 = 6
    model = path_tree(routing, depth, r)
    total = active = 0
    for module in model.modules():
        if isinstance(module, TreeLoraLinear):
            width = module.in_features + module.out_features
            total += (2**depth * 2 + (2**depth - 1) * 2) * width
            active += r * width
            if routing == "token":
                total += (2**depth - 1) * (module.in_features + 1)
                active += depth * (module.in_features + 1)
    if routing == "sequence":
        total += (2**depth - 1) * (model.base_model.model.config.hidden_size + 1)
    counts = model.base_model.parameter_counts()
    assert counts == {"total": total, "active_per_token": active}
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    summary = summarize_adapter(tmp_path)
    assert (summary.total_parameters, summary.active_per_token) == (total, active)


def test_the_card_of_a_path_tree_states_the_rank_per_path(tmp_path):
    path_tree("token").save_pretrained(tmp_path)
    card = card_section(summarize_adapter(tmp_path), str(tmp_path))
    assert "rank per path | 6, split over the path's nodes" in card and "rank per leaf" not in card


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"leaf_layout": "node"}, r"leaf_layout must be one of \['leaf', 'path'\]"),
        ({"leaf_layout": "path", "depth": 3, "r": 3}, r"r must be >= depth \+ 1 = 4"),
        ({"leaf_layout": "path", "path_node_rank": 0}, r"path_node_rank must be an integer >= 1"),
        ({"leaf_layout": "path", "depth": 3, "r": 8, "path_node_rank": 3}, r"path_node_rank must leave the leaf"),
        ({"path_node_rank": 1}, r"path_node_rank .* leaf_layout is 'leaf'"),
    ],
)
def test_invalid_path_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        TreeLoraConfig(**settings)


def test_a_depth_zero_path_tree_is_the_plain_lora_of_a_depth_zero_tree(input_ids):
    torch.manual_seed(5)
    path = tree_model(make_tiny_llama(), depth=0, r=4, leaf_layout="path", init_lora_weights=False).eval()
    torch.manual_seed(5)
    leaf = tree_model(make_tiny_llama(), depth=0, r=4, init_lora_weights=False).eval()
    assert not any("treelora_node" in name for name, _ in path.named_parameters())
    assert torch.equal(logits(path, input_ids), logits(leaf, input_ids))
    assert path.base_model.parameter_counts() == leaf.base_model.parameter_counts()


def test_the_capacity_study_path_arm_gives_each_node_of_a_path_the_studys_rank():
    settings = capacity.CapacitySettings()
    for key in ("tree_path", "tree_leaf_wide"):
        arm = capacity.tree_arm(key, settings)
        assert arm.rank == settings.rank * (settings.depth + 1)
    config = capacity.checked_config(capacity.tree_arm("tree_path", settings))
    assert config.leaf_layout == "path" and config.path_ranks() == (settings.rank, settings.rank)
