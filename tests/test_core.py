"""TreeLoRA layers and their behaviour inside a PEFT model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import LoraConfig, get_peft_model

from peft_tree_lora import TreeLoraLinear, TreeLoraSequenceRouter

ROUTINGS = ["token", "sequence"]
DEPTHS = [0, 1, 4]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_fresh_adapter_leaves_the_outputs_unchanged(depth, routing, input_ids):
    base = make_tiny_llama()
    expected = logits(base, input_ids)
    model = tree_model(base, depth=depth, routing=routing)
    torch.testing.assert_close(logits(model.eval(), input_ids), expected)
    torch.testing.assert_close(logits(model.train(), input_ids), expected)


@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_depth_zero_equals_peft_lora_with_the_same_weights(make_base, input_ids):
    is_gpt2 = make_base is make_tiny_gpt2
    lora = get_peft_model(
        make_base(),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, fan_in_fan_out=is_gpt2),
    )
    tree = tree_model(make_base(), depth=0)
    tree_layers = {n: m for n, m in tree.named_modules() if isinstance(m, TreeLoraLinear)}
    assert tree_layers, "no layer was adapted"
    with torch.no_grad():
        for name, layer in tree_layers.items():
            lora_layer = lora.get_submodule(name)
            layer.treelora_A["default"][0].copy_(lora_layer.lora_A["default"].weight)
            layer.treelora_B["default"][0].copy_(lora_layer.lora_B["default"].weight)
    assert not torch.allclose(logits(tree, input_ids), logits(make_base(), input_ids))
    torch.testing.assert_close(logits(tree.eval(), input_ids), logits(lora.eval(), input_ids))
    torch.manual_seed(7)  # GPT-2 has dropout: same masks for both runs
    tree_train = logits(tree.train(), input_ids)
    torch.manual_seed(7)
    torch.testing.assert_close(tree_train, logits(lora.train(), input_ids))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("depth", [1, 4])
def test_hard_evaluation_equals_soft_evaluation_once_routers_saturate(depth, routing, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=depth, routing=routing), router_scale=1e6).eval()
    hard = logits(model, input_ids)
    model.base_model.set_inference_routing("soft")
    torch.testing.assert_close(logits(model, input_ids), hard, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_soft_evaluation_mixes_leaves_and_differs_from_hard_before_saturation(routing, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing=routing, router_init_scale=0.1)).eval()
    hard = logits(model, input_ids)
    model.base_model.set_inference_routing("soft")
    assert not torch.allclose(logits(model, input_ids), hard, atol=1e-3)


def _q_proj_tree(training_routing: str):
    model = trained_looking(
        tree_model(make_tiny_llama(), depth=2, target_modules=["q_proj"], training_routing=training_routing)
    )
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _by_hand(layer, x):
    """Path weights, hard leaf and every leaf's output for `x`, written out for a depth-2 tree."""
    lora_A, lora_B = layer.treelora_A["default"], layer.treelora_B["default"]
    p = torch.sigmoid(layer.treelora_router["default"](x))
    weights = torch.stack(
        [(1 - p[:, 0]) * (1 - p[:, 1]), (1 - p[:, 0]) * p[:, 1], p[:, 0] * (1 - p[:, 2]), p[:, 0] * p[:, 2]], -1
    )
    first = (p[:, 0] >= 0.5).long()  # descend: right where p >= 0.5, children of node n at 2n+1 and 2n+2
    second = (p.gather(1, (1 + first).unsqueeze(1)).squeeze(1) >= 0.5).long()
    leaf = 2 * first + second
    outputs = torch.stack([2.0 * x @ lora_A[k].T @ lora_B[k].T for k in range(4)], 1)  # scaling alpha / r = 2
    chosen = outputs[torch.arange(x.shape[0]), leaf]
    return weights, leaf, outputs, chosen


def test_soft_training_mixes_every_leaf_by_its_path_probability():
    layer = _q_proj_tree("soft")
    x = torch.randn(5, layer.in_features)
    weights, _, outputs, chosen = _by_hand(layer, x)
    layer.train()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (weights.unsqueeze(-1) * outputs).sum(1))
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + chosen)


def test_hard_training_computes_the_function_that_evaluation_serves():
    layer = _q_proj_tree("hard")
    x = torch.randn(5, layer.in_features)
    _, _, _, chosen = _by_hand(layer, x)
    layer.train()
    trained = layer(x)
    layer.eval()
    served = layer(x)
    torch.testing.assert_close(trained, layer.base_layer(x) + chosen)
    torch.testing.assert_close(served, trained)


def test_hard_training_teaches_each_leaf_only_its_own_rows_and_the_routers_through_path_probabilities():
    layer = _q_proj_tree("hard").train()
    x = torch.randn(5, layer.in_features)
    _, leaf, _, _ = _by_hand(layer, x)
    layer(x).pow(2).sum().backward()
    grad_B = layer.treelora_B["default"].grad.abs().sum(dim=(1, 2))
    used = torch.zeros(4, dtype=torch.bool)
    used[leaf] = True
    assert (grad_B[used] > 0).all() and (grad_B[~used] == 0).all()
    assert layer.treelora_router["default"].weight.grad.abs().sum() > 0


def test_switch_training_and_serving_scale_the_chosen_leaf_by_its_path_probability():
    layer = _q_proj_tree("switch")
    x = torch.randn(5, layer.in_features)
    weights, leaf, _, chosen = _by_hand(layer, x)
    expected = layer.base_layer(x) + weights[torch.arange(5), leaf].unsqueeze(1) * chosen
    layer.train()
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_only_adapter_parameters_receive_gradients(routing, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing=routing)).train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".treelora_" in n for n in trainable)
    routers = [p for n, p in model.named_parameters() if ".treelora_router." in n]
    assert routers and all(p.grad.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_training_loss_includes_the_weighted_auxiliary_losses(routing, input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing=routing)).train()
    outputs = model(input_ids=input_ids, labels=input_ids)
    plain = tree_model(
        make_tiny_llama(), depth=2, routing=routing, hardening_loss_weight=0.0, load_balance_loss_weight=0.0
    )
    plain.load_state_dict(model.state_dict())
    task = plain.train()(input_ids=input_ids, labels=input_ids)
    assert outputs.aux_loss > 0 and getattr(task, "aux_loss", None) is None
    assert "aux_loss" not in outputs.keys()  # DDP rebuilds outputs from their keys: no key the class lacks
    torch.testing.assert_close(outputs.loss, task.loss + outputs.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("routing", "modules", "trees"), [("token", 1, 1), ("token", 4, 4), ("block", 4, 1)])
def test_auxiliary_loss_weights_apply_to_each_tree_whatever_the_number_of_trees(routing, modules, trees, input_ids):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"][:modules]
    model = tree_model(make_tiny_llama(num_hidden_layers=1), depth=2, target_modules=targets, routing=routing).train()
    model.base_model.set_inference_routing("soft")
    with torch.no_grad():
        aux = float(model(input_ids=input_ids, labels=input_ids).aux_loss)
        routed = [m for m in model.modules() if isinstance(m, TreeLoraLinear) and "default" in m.treelora_router]
        per_tree = [float(layer.router_losses["default"](*_router_state(layer, model, input_ids))) for layer in routed]
    assert len(per_tree) == trees  # a block's modules share one tree, and its loss counts once
    assert aux == pytest.approx(sum(per_tree), rel=1e-5)


def _router_state(layer, model, input_ids):
    """The logits and hard leaves of one layer's routers for its input in a forward pass of `model`."""
    seen = {}
    handle = layer.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    model(input_ids=input_ids)
    handle.remove()
    x = seen["x"].reshape(-1, layer.in_features)
    router = layer.treelora_router["default"]
    return router(x), router.leaf(x)


def test_auxiliary_loss_gradient_reaches_the_routers_without_labels():
    model = tree_model(
        make_tiny_llama(), depth=2, target_modules=["q_proj"], hardening_loss_weight=0.05, load_balance_loss_weight=0.0
    ).train()
    out = model(input_ids=torch.randint(3, 90, (2, 6))).logits
    (out.sum() * 0).backward()  # the task contributes nothing: any router gradient comes from the hardening loss
    grads = [p.grad for n, p in model.named_parameters() if ".treelora_router." in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_two_sequences_of_one_batch_can_take_different_leaves():
    model = trained_looking(tree_model(make_tiny_llama(), depth=1, routing="sequence")).eval()
    router_layer = model.base_model.model.model.embed_tokens
    assert isinstance(router_layer, TreeLoraSequenceRouter)
    embed = router_layer.base_layer.weight
    a, b = 10, 20
    with torch.no_grad():
        direction = embed[a] - embed[b]
        router = router_layer.treelora_router["default"]
        router.weight.copy_(direction.unsqueeze(0))
        router.bias.fill_(-(direction @ (embed[a] + embed[b]) / 2))
    batch = torch.tensor([[a] * 6, [b] * 6])
    assert model.base_model.leaf_routes(batch)["sequence"].tolist() == [1, 0]
    together = logits(model, batch)
    torch.testing.assert_close(together[0], logits(model, batch[:1])[0])
    torch.testing.assert_close(together[1], logits(model, batch[1:])[0])
    with model.base_model.pinned_leaf(0):
        assert not torch.allclose(logits(model, batch[:1])[0], together[0])


def _right_padded(prompts: torch.Tensor, pad: int, extra: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    padding = torch.full((prompts.shape[0], extra), pad, dtype=torch.long)
    mask = torch.cat([torch.ones_like(prompts), torch.zeros_like(padding)], dim=1)
    return torch.cat([prompts, padding], dim=1), mask


def _sequence_leaves(model, input_ids, attention_mask=None) -> list[int]:
    return model.base_model.leaf_routes(input_ids, attention_mask=attention_mask)["sequence"].tolist()


@pytest.fixture
def sequence_tree():
    return trained_looking(tree_model(make_tiny_llama(), depth=4, routing="sequence")).eval()


@pytest.fixture
def prompts() -> torch.Tensor:
    return torch.randint(3, 90, (16, 7), generator=torch.Generator().manual_seed(5))


def test_sequence_route_pools_only_the_positions_the_attention_mask_marks(sequence_tree, prompts):
    padded, mask = _right_padded(prompts, pad=7)
    assert _sequence_leaves(sequence_tree, padded, mask) == _sequence_leaves(sequence_tree, prompts)


def test_sequence_route_without_a_mask_leaves_out_the_models_pad_token(sequence_tree, prompts):
    pad = sequence_tree.config.pad_token_id
    padded, _ = _right_padded(prompts, pad=pad)
    assert _sequence_leaves(sequence_tree, padded) == _sequence_leaves(sequence_tree, prompts)


def test_sequence_route_without_a_mask_pools_tokens_that_are_not_the_pad_token(sequence_tree, prompts):
    padded, _ = _right_padded(prompts, pad=7)  # not the pad id: nothing says it is padding, so it is pooled
    assert _sequence_leaves(sequence_tree, padded) != _sequence_leaves(sequence_tree, prompts)


def test_leaf_routes_reports_each_module_for_token_routing(input_ids):
    model = tree_model(make_tiny_llama(), depth=3)
    routes = model.base_model.leaf_routes(input_ids)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, TreeLoraLinear)}
    assert set(routes) == adapted
    for leaf in routes.values():
        assert leaf.shape == input_ids.shape and 0 <= leaf.min() and leaf.max() < 8


def test_disable_adapter_gives_the_base_model_outputs(input_ids):
    base_logits = logits(make_tiny_llama(), input_ids)
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing="sequence")).eval()
    assert not torch.allclose(logits(model, input_ids), base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base_logits)
    assert not torch.allclose(logits(model, input_ids), base_logits)


def test_several_adapters_can_be_added_switched_and_deleted(input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing="sequence")).eval()
    first = logits(model, input_ids)
    from peft_tree_lora import TreeLoraConfig

    model.add_adapter("other", TreeLoraConfig(depth=1, r=4, target_modules=["q_proj", "v_proj"]))
    trained_looking(model, seed=3)
    model.set_adapter("other")
    other = logits(model, input_ids)
    assert not torch.allclose(other, first)
    model.delete_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), other)
    assert not any(".default" in n for n, _ in model.named_parameters())


def test_adding_an_adapter_with_an_existing_name_is_refused():
    model = tree_model(make_tiny_llama(), depth=1)
    from peft_tree_lora import TreeLoraConfig

    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", TreeLoraConfig(depth=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("name", ["with.dot", "", "3d"])
def test_adapter_names_that_would_break_state_dict_keys_are_refused(name):
    from peft_tree_lora import TreeLoraConfig

    model = tree_model(make_tiny_llama(), depth=1)
    with pytest.raises(ValueError, match="adapter names"):
        model.add_adapter(name, TreeLoraConfig(depth=1, target_modules=["q_proj"]))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_unload_gives_back_the_plain_base_model(routing, input_ids):
    base_logits = logits(make_tiny_llama(), input_ids)
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, routing=routing))
    base = model.unload()
    assert not any(isinstance(m, (TreeLoraLinear, TreeLoraSequenceRouter)) for m in base.modules())
    assert not base._forward_pre_hooks
    torch.testing.assert_close(logits(base, input_ids), base_logits)


@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_and_unload_of_depth_zero_keeps_the_outputs(make_base, input_ids):
    model = trained_looking(tree_model(make_base(), depth=0)).eval()
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, TreeLoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-4, atol=1e-5)


def test_merging_an_unpinned_tree_is_refused_and_changes_nothing(input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2)).eval()
    expected = logits(model, input_ids)
    with pytest.raises(ValueError, match="chosen per input"):
        model.merge_and_unload()
    assert any(isinstance(m, TreeLoraLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, input_ids), expected)


def test_trainable_parameter_count_is_every_leaf_and_router():
    model = tree_model(make_tiny_llama(), depth=3, target_modules=["q_proj"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = model.base_model.parameter_counts()
    # q_proj is 32 -> 32 in 2 layers: 8 leaves of rank 4 and 7 routers of 32 weights + bias
    assert trainable == counts["total"] == 2 * (8 * 4 * (32 + 32) + 7 * 33)
    assert counts["active_per_token"] == 2 * (4 * (32 + 32) + 3 * 33)


@pytest.mark.parametrize("targets", [["q_proj", "rotary_emb"], ["embed_tokens"]])
def test_target_that_is_not_linear_is_refused_and_the_model_left_as_it_was(targets, input_ids):
    base = make_tiny_llama()
    expected = logits(base, input_ids)
    with pytest.raises(ValueError, match=r"TreeLoRA adapts torch.nn.Linear and transformers Conv1D layers"):
        tree_model(base, depth=1, target_modules=targets)
    assert not any(isinstance(m, (TreeLoraLinear, TreeLoraSequenceRouter)) for m in base.modules())
    torch.testing.assert_close(logits(base, input_ids), expected)


def test_default_target_modules_are_loras_and_layers_can_be_restricted():
    model = tree_model(make_tiny_llama(), depth=1, target_modules=None)
    assert {n.rsplit(".", 1)[-1] for n in model.base_model.targeted_module_names} == {"q_proj", "v_proj"}
    model = tree_model(make_tiny_llama(), depth=1, target_modules=["q_proj"], layers_to_transform=[1])
    assert model.base_model.targeted_module_names == ["model.layers.1.self_attn.q_proj"]


def test_block_routing_sends_every_token_to_one_leaf_index_in_every_module_of_its_block(input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=3, routing="block", router_init_scale=3.0))
    routes = model.base_model.leaf_routes(input_ids)
    for block in ("model.layers.0.", "model.layers.1."):
        in_block = [leaf for name, leaf in routes.items() if name.startswith(block)]
        assert len(in_block) == 7  # q, k, v, o, gate, up, down
        assert all(torch.equal(leaf, in_block[0]) for leaf in in_block)
    assert not torch.equal(routes["model.layers.0.self_attn.q_proj"], routes["model.layers.1.self_attn.q_proj"])


def test_block_routing_keeps_one_router_per_block_and_counts_it_once_per_token():
    model = tree_model(make_tiny_llama(), depth=3, routing="block")
    routers = [n for n, _ in model.named_parameters() if ".treelora_router." in n and n.endswith("weight")]
    assert [n.split(".treelora_router")[0].removeprefix("base_model.model.") for n in routers] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    token = tree_model(make_tiny_llama(), depth=3, routing="token").base_model.parameter_counts()
    block = model.base_model.parameter_counts()
    config = make_tiny_llama().config
    followers_routers = 3 * (5 * (config.hidden_size + 1) + (config.intermediate_size + 1))  # k v o gate up, down
    assert token["active_per_token"] - block["active_per_token"] == config.num_hidden_layers * followers_routers


def test_set_training_routing_changes_how_training_applies_the_leaves(input_ids):
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, training_routing="hard")).train()
    with torch.no_grad():
        hard = model(input_ids=input_ids).logits
        model.base_model.set_training_routing("soft")
        soft = model(input_ids=input_ids).logits
        model.base_model.set_training_routing("hard")
        again = model(input_ids=input_ids).logits
    assert not torch.allclose(hard, soft, atol=1e-4)
    torch.testing.assert_close(again, hard)
    with pytest.raises(ValueError, match=r"training routing must be one of \['hard', 'switch', 'soft'\]"):
        model.base_model.set_training_routing("mixed")
