"""TreeLoraConfig: defaults, validation and registration with PEFT."""

from __future__ import annotations

import importlib

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_tree_lora
from peft_tree_lora import MAX_DEPTH, TreeLoraConfig, TreeLoraModel


def test_import_registers_treelora_with_peft():
    assert PeftType.TREELORA.value == "TREELORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TREELORA] is TreeLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TREELORA] is TreeLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TREELORA] == "treelora_"


def test_registering_twice_is_harmless():
    peft_tree_lora.register()
    importlib.reload(peft_tree_lora.tuner.registration)
    peft_tree_lora.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TREELORA] is TreeLoraConfig


def test_defaults_describe_a_block_routed_tree():
    config = TreeLoraConfig()
    assert (config.depth, config.r, config.routing, config.inference_routing) == (3, 8, "block", "hard")
    assert config.num_leaves == 8
    assert config.peft_type == PeftType.TREELORA


def test_config_round_trips_through_json(tmp_path):
    config = TreeLoraConfig(depth=4, r=4, routing="sequence", target_modules=["q_proj", "v_proj"])
    config.save_pretrained(tmp_path)
    assert '"peft_type": "TREELORA"' in (tmp_path / "adapter_config.json").read_text()
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TreeLoraConfig)
    assert (loaded.depth, loaded.r, loaded.routing) == (4, 4, "sequence")
    assert set(loaded.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("depth", -1, f"an integer from 0 to {MAX_DEPTH}"),
        ("depth", MAX_DEPTH + 1, f"an integer from 0 to {MAX_DEPTH}"),
        ("depth", 2.0, "an integer"),
        ("depth", True, "an integer"),
        ("r", 0, "an integer >= 1"),
        ("lora_alpha", 0, "> 0"),
        ("lora_alpha", float("nan"), "finite number"),
        ("lora_dropout", 1.0, "[0, 1)"),
        ("lora_dropout", -0.1, "[0, 1)"),
        ("routing", "layer", "['token', 'block', 'sequence']"),
        ("training_routing", "mixed", "['hard', 'switch', 'soft']"),
        ("load_balance", "entropy", "['kl', 'switch']"),
        ("inference_routing", "argmax", "['hard', 'soft']"),
        ("router_init", "orthogonal", "['random', 'zeros']"),
        ("router_init_scale", 0.0, "> 0"),
        ("hardening_loss_weight", -0.1, ">= 0"),
        ("load_balance_loss_weight", float("inf"), "finite number"),
        ("bias", "all", "['none']"),
        ("init_lora_weights", "yes", "True or False"),
        ("target_modules", 5, "a string (a regex) or a list of module names"),
        ("target_modules", ["q_proj", 5], "a list of module names"),
        ("exclude_modules", 3, "a string (a regex) or a list of module names"),
        ("layers_to_transform", "0", "a layer index (an integer >= 0) or a list of them"),
        ("layers_to_transform", [0, -1], "a layer index (an integer >= 0) or a list of them"),
        ("modules_to_save", [5], "a list of module names, e.g. ['lm_head']"),
        ("modules_to_save", "lm_head", "a list of module names, e.g. ['lm_head']"),
    ],
)
def test_invalid_value_names_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as error:
        TreeLoraConfig(**{field: value})
    assert f"TreeLoraConfig.{field}" in str(error.value)
    assert allowed in str(error.value)


def test_layers_to_transform_with_regex_target_is_refused():
    with pytest.raises(ValueError, match="layers_to_transform"):
        TreeLoraConfig(target_modules=".*proj", layers_to_transform=[0])


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_pattern"):
        TreeLoraConfig(layers_pattern="layers")


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unexpected keyword argument 'leaves'"):
        TreeLoraConfig(leaves=16)
