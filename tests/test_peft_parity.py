"""Behaviours a PEFT user expects of a built-in method: merging a pinned leaf, 2-D inputs, unsupported options."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from transformers import BertConfig, BertForSequenceClassification

from peft_tree_lora import TreeLoraConfig, TreeLoraLinear


def pinned_sequence_tree():
    return trained_looking(tree_model(make_tiny_llama(), depth=2, routing="sequence")).eval()


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def test_merging_a_pinned_leaf_gives_the_pinned_outputs_and_unmerging_restores_the_base(input_ids):
    model = pinned_sequence_tree()
    before = base_weights(model)
    model.base_model.pin_leaf(1)
    pinned = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), pinned, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    after = base_weights(model)
    assert all(torch.allclose(after[name], before[name], atol=1e-6) for name in before)


@pytest.mark.parametrize("action", ["pin another leaf", "unpin the leaf"])
def test_changing_the_pinned_leaf_while_merged_is_refused(action):
    model = pinned_sequence_tree()
    model.base_model.pin_leaf(1)
    model.merge_adapter()
    with pytest.raises(ValueError, match=f"merged into the base weights; unmerge it first .* to {action}"):
        model.base_model.pin_leaf(3) if action == "pin another leaf" else model.base_model.unpin_leaf()


def test_disable_adapter_after_a_merge_gives_the_base_outputs(input_ids):
    base = logits(make_tiny_llama(), input_ids)
    model = pinned_sequence_tree()
    model.base_model.pin_leaf(2)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base, rtol=1e-4, atol=1e-4)


def tiny_bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def test_sequence_routing_gives_a_pooled_two_dimensional_input_the_leaf_of_its_sequence(input_ids):
    from peft import get_peft_model

    from peft_tree_lora import TreeLoraConfig

    config = TreeLoraConfig(
        depth=2, r=2, routing="sequence", target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False
    )
    model = get_peft_model(tiny_bert_classifier(), config).eval()
    with torch.no_grad():
        together = model(input_ids=input_ids).logits
        alone = torch.cat([model(input_ids=input_ids[i : i + 1]).logits for i in range(input_ids.shape[0])])
    assert together.shape == (input_ids.shape[0], 3)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batches_are_refused_with_what_to_do_instead(input_ids):
    model = tree_model(make_tiny_llama(), depth=2)
    with pytest.raises(ValueError, match="adapter_names=.*set_adapter"):
        model(input_ids=input_ids, adapter_names=["default"] * input_ids.shape[0])


def test_the_sequence_router_reports_its_feature_sizes_like_a_linear_layer():
    model = tree_model(make_tiny_llama(), depth=2, routing="sequence")
    router_layer = model.base_model.model.model.embed_tokens
    hidden = model.config.hidden_size
    assert (router_layer.in_features, router_layer.out_features) == (hidden, hidden)
    router = router_layer.treelora_router["default"]
    assert (router.in_features, router.out_features) == (hidden, 3)


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_of_a_broken_leaf_says_so_in_lora_words_and_merges_no_layer(how):
    model = pinned_sequence_tree()
    model.base_model.pin_leaf(1)
    last = [m for m in model.modules() if isinstance(m, TreeLoraLinear)][-1]
    with torch.no_grad():
        last.treelora_B["default"][1, 0, 0] = float("nan")
    before = base_weights(model)
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_adapter(safe_merge=True) if how == "merge_adapter" else model.merge_and_unload(safe_merge=True)
    after = base_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before), "a layer was merged before the refusal"
    assert not any(m.merged for m in model.modules() if isinstance(m, TreeLoraLinear))


@pytest.mark.parametrize("on", ["PeftModel", "base_model"])
def test_add_weighted_adapter_says_treelora_does_not_support_it_and_what_to_do(on):
    model = pinned_sequence_tree()
    target = model if on == "PeftModel" else model.base_model
    with pytest.raises(ValueError, match="TreeLoRA does not support add_weighted_adapter.*model.set_adapter"):
        target.add_weighted_adapter(["default"], [1.0], "combined")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("call", ["add_adapter positional", "add_adapter keyword", "get_peft_model"])
def test_an_adapter_name_that_is_not_a_string_is_refused_with_what_a_name_must_be(call):
    from peft import get_peft_model

    config = TreeLoraConfig(depth=1, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="TreeLoRA adapter names must be strings .*; got None"):
        if call == "add_adapter positional":
            pinned_sequence_tree().add_adapter(None, config)
        elif call == "add_adapter keyword":
            pinned_sequence_tree().add_adapter(adapter_name=None, peft_config=config)
        else:
            get_peft_model(make_tiny_llama(), config, adapter_name=None)


def test_merging_into_an_integer_weight_that_is_not_bitsandbytes_is_refused_naming_what_is_supported():
    model = trained_looking(tree_model(make_tiny_llama(), depth=0))
    layer = model.base_model.model.model.layers[1].mlp.down_proj.base_layer
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    before = base_weights(model)
    with pytest.raises(ValueError, match="cannot merge into Linear .* supports float weights, bitsandbytes"):
        model.merge_and_unload()
    after = base_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before)  # refused before the first layer merged
