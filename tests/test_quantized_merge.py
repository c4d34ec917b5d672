"""Merging into a bitsandbytes-quantised base (4-bit and 8-bit, bitsandbytes' real CPU backend): dequantise, add,
requantise, as PEFT's LoRA does; unmerging gives the quantised weights back bit for bit.

The tiny Llama here has hidden size 64: bitsandbytes' CPU kernels cannot evaluate a 4-bit layer narrower than its
block size (64) on CPUs with AVX512-BF16."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, tree_model
from torch import nn

from peft_tree_lora import TreeLoraLinear

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'bitsandbytes>=0.50')")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' casting notes, PEFT's merge notes


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama64")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantization_error(saved_llama):
    """How far each quantised base's outputs are from the float model's: the scale of one rounding of the weights."""
    ids = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    full = fresh_logits(AutoModelForCausalLM.from_pretrained(saved_llama), ids)
    return {bits: (fresh_logits(quantized(saved_llama, bits), ids) - full).abs().max().item() for bits in (4, 8)}


def quantized(path, bits: int) -> nn.Module:
    config = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


def fresh_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The outputs, computed in training mode (the same function: no dropout in the tiny Llama), where bitsandbytes
    keeps 4-bit weights in their standard layout instead of repacking them for its CPU kernels."""
    model.train()
    try:
        return logits(model, input_ids)
    finally:
        model.eval()


def tree_and_lora_with_the_same_update(path, bits: int):
    """A depth-0 tree and a PEFT LoRA on two copies of one quantised base, the LoRA given the tree's leaf."""
    torch.manual_seed(0)
    tree = tree_model(quantized(path, bits), depth=0).eval()
    lora = get_peft_model(quantized(path, bits), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    leaves = {name: module for name, module in tree.named_modules() if isinstance(module, TreeLoraLinear)}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in lora.named_modules():
            if name in leaves:
                leaf = leaves[name]
                leaf.treelora_B["default"].normal_(0.0, 0.02, generator=generator)  # the size of the base weights
                module.lora_A["default"].weight.copy_(leaf.treelora_A["default"][0])
                module.lora_B["default"].weight.copy_(leaf.treelora_B["default"][0])
    return tree, lora


def merge_error(model: nn.Module, input_ids: torch.Tensor) -> float:
    unmerged = fresh_logits(model, input_ids)
    model.merge_adapter()
    return (fresh_logits(model, input_ids) - unmerged).abs().max().item()


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.data.clone() for name, p in model.named_parameters() if "base_layer.weight" in name}


@pytest.mark.parametrize("bits", [4, 8])
def test_merging_into_a_quantized_base_costs_the_error_of_merging_a_lora(
    saved_llama, input_ids, quantization_error, bits
):
    tree, lora = tree_and_lora_with_the_same_update(saved_llama, bits)
    tree_error, lora_error = merge_error(tree, input_ids), merge_error(lora, input_ids)
    assert tree_error == pytest.approx(lora_error, rel=0.25)
    assert 0 < tree_error < 2 * quantization_error[bits]  # one more rounding, not a lost or doubled update


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights on AVX512-BF16")
def test_a_4bit_weight_repacked_by_an_evaluation_pass_merges_as_well_as_a_fresh_one(saved_llama, input_ids):
    model, _ = tree_and_lora_with_the_same_update(saved_llama, 4)
    fresh_error = merge_error(tree_and_lora_with_the_same_update(saved_llama, 4)[0], input_ids)
    unmerged = logits(model, input_ids)  # an evaluation pass: bitsandbytes repacks the weights for its CPU kernel
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.quant_state.packing_format_for_cpu
    model.merge_adapter()
    assert (logits(model, input_ids) - unmerged).abs().max().item() < 1.5 * fresh_error


@pytest.mark.parametrize("bits", [4, 8])
def test_unmerging_gives_the_quantized_base_weights_back_bit_for_bit(saved_llama, input_ids, bits):
    model, _ = tree_and_lora_with_the_same_update(saved_llama, bits)
    unmerged = logits(model, input_ids)  # first, as it may repack 4-bit weights
    before = quantized_weights(model)
    for _ in range(2):
        model.merge_adapter()
        logits(model, input_ids)
        model.unmerge_adapter()
    after = quantized_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(logits(model, input_ids), unmerged)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_of_a_quantized_base_gives_quantized_layers_and_the_merged_outputs(
    saved_llama, input_ids, bits
):
    model, _ = tree_and_lora_with_the_same_update(saved_llama, bits)
    model.merge_adapter()
    merged = logits(model, input_ids)
    model.unmerge_adapter()
    unloaded = model.merge_and_unload()
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert not any(isinstance(m, TreeLoraLinear) for m in unloaded.modules())
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, layer_type)
    torch.testing.assert_close(logits(unloaded, input_ids), merged, rtol=0, atol=1e-6)


def test_a_pinned_leaf_of_a_sequence_routed_tree_merges_into_a_4bit_base(saved_llama, input_ids, quantization_error):
    torch.manual_seed(0)
    model = tree_model(quantized(saved_llama, 4), depth=2, routing="sequence").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraLinear):
                module.treelora_B["default"].normal_(0.0, 0.02, generator=generator)
    with model.base_model.pinned_leaf(1):
        other_leaf = fresh_logits(model, input_ids)
    model.base_model.pin_leaf(2)
    pinned = fresh_logits(model, input_ids)
    model.merge_adapter()
    error = (fresh_logits(model, input_ids) - pinned).abs().max().item()
    assert error < 2 * quantization_error[4] and error < (other_leaf - pinned).abs().max().item() / 2


def test_safe_merge_into_a_quantized_base_refuses_a_broken_update_and_changes_nothing(saved_llama, input_ids):
    model, _ = tree_and_lora_with_the_same_update(saved_llama, 4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraLinear):
                module.treelora_B["default"][0, 0, 0] = float("nan")
    before = quantized_weights(model)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    after = quantized_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.merged
