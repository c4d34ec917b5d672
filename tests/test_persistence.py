"""Saving and loading TreeLoRA adapters like LoRA ones, and refusing checkpoints that do not fit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from peft_tree_lora import TreeLoraLinear, TreeLoraSequenceRouter

ROUTINGS = ["token", "sequence"]
CASES = [(depth, routing) for depth in (0, 1, 4) for routing in ROUTINGS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    make_tiny_llama().save_pretrained(path)
    return path


def load_base(base_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base_dir).eval()


def save_adapter(base_dir, out_dir, seed=0, safe_serialization=True, **config):
    model = trained_looking(tree_model(load_base(base_dir), **config), seed=seed).eval()
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return model


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, (TreeLoraLinear, TreeLoraSequenceRouter))]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_saved_adapter_is_safetensors_with_routers_under_treelora_router_keys(base_dir, tmp_path, routing):
    save_adapter(base_dir, tmp_path, depth=2, routing=routing)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TREELORA" and config["depth"] == 2 and config["routing"] == routing
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    routers = [k for k in tensors if ".treelora_router." in k]
    assert routers, "the routers were not saved"
    assert all(".default" not in k for k in tensors), "the adapter name must not be part of saved keys"
    leaves = [k for k in tensors if k.endswith("treelora_A")]
    assert all(tensors[k].shape[0] == 4 for k in leaves)
    if routing == "sequence":
        assert all("embed_tokens.treelora_router" in k for k in routers)
    assert not list(tmp_path.glob("*.bin"))


def test_reloading_in_a_fresh_process_gives_identical_logits(base_dir, tmp_path):
    input_ids = torch.randint(3, 90, (3, 10), generator=torch.Generator().manual_seed(5))
    expected = {}
    for depth, routing in CASES:
        name = f"d{depth}-{routing}"
        model = save_adapter(base_dir, tmp_path / name, depth=depth, routing=routing)
        expected[name] = logits(model, input_ids)
    save_file({"input_ids": input_ids, **expected}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import load_file
        import peft_tree_lora
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import LlamaForCausalLM
        data = load_file({str(tmp_path / "expected.safetensors")!r})
        ids = data.pop("input_ids")
        for name, expected in data.items():
            path = {str(tmp_path)!r} + "/" + name
            for how in ("PeftModel", "AutoPeftModel"):
                if how == "PeftModel":
                    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(base_dir)!r}), path)
                else:
                    model = AutoPeftModelForCausalLM.from_pretrained(path)
                with torch.no_grad():
                    got = model.eval()(input_ids=ids).logits
                print(name, how, "identical" if torch.equal(got, expected) else "DIFFERENT")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 * len(CASES)
    assert all(line.endswith("identical") for line in lines), lines


@pytest.mark.parametrize("routing", ROUTINGS)
def test_transformers_load_adapter_gives_the_same_logits(base_dir, tmp_path, routing):
    input_ids = torch.randint(3, 90, (2, 9))
    expected = logits(save_adapter(base_dir, tmp_path, depth=3, routing=routing), input_ids)
    base = load_base(base_dir)
    base.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(base.eval(), input_ids), expected)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable_decides_whether_the_loaded_adapter_is_frozen(base_dir, tmp_path, is_trainable):
    save_adapter(base_dir, tmp_path, depth=2, routing="sequence")
    model = PeftModel.from_pretrained(load_base(base_dir), tmp_path, is_trainable=is_trainable)
    adapter = [p for n, p in model.named_parameters() if ".treelora_" in n]
    assert adapter and all(p.requires_grad == is_trainable for p in adapter)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".treelora_" not in n)


def test_auto_peft_model_loads_a_second_adapter_by_name(base_dir, tmp_path):
    input_ids = torch.randint(3, 90, (2, 8))
    first = logits(save_adapter(base_dir, tmp_path / "a", depth=1), input_ids)
    second = logits(save_adapter(base_dir, tmp_path / "b", seed=4, depth=2, routing="sequence"), input_ids)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    model.load_adapter(tmp_path / "b", adapter_name="second")
    torch.testing.assert_close(logits(model, input_ids), first)
    model.set_adapter("second")
    torch.testing.assert_close(logits(model, input_ids), second)


# --- checkpoints that do not fit ----------------------------------------------------------------------------------


def assert_left_as_it_was(base, reference_logits, input_ids):
    assert not adapter_layers(base), "adapter layers were left in the base model"
    assert not hasattr(base, "peft_config")
    assert not base._forward_pre_hooks
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(logits(base, input_ids), reference_logits)


def test_adapter_for_other_shapes_names_module_and_both_shapes_and_leaves_the_model_as_it_was(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path, depth=2)
    other = make_tiny_llama(intermediate_size=48)
    for p in other.parameters():
        p.requires_grad_(True)
    input_ids = torch.randint(3, 90, (2, 6))
    reference = logits(other, input_ids)
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(other, tmp_path)
    message = str(error.value)
    assert "model.layers.0.mlp.gate_proj" in message
    assert "checkpoint has (4, 64, 4), the model needs (4, 48, 4)" in message
    assert_left_as_it_was(other, reference, input_ids)


def test_checkpoint_missing_router_tensors_is_refused(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path, depth=2)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if ".treelora_router." not in k}
    save_file(tensors, weights)
    base = load_base(base_dir)
    for p in base.parameters():
        p.requires_grad_(True)
    input_ids = torch.randint(3, 90, (2, 6))
    reference = logits(base, input_ids)
    with pytest.raises(ValueError, match=r"missing router tensor .*q_proj\.treelora_router\.weight"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_left_as_it_was(base, reference, input_ids)


def test_depth_in_config_that_does_not_match_the_tensors_is_refused(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path, depth=2)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["depth"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"4 leaves, depth 2, but adapter_config.json says depth=3"):
        PeftModel.from_pretrained(load_base(base_dir), tmp_path)


def test_second_adapter_that_does_not_fit_is_removed_and_the_first_kept(base_dir, tmp_path):
    input_ids = torch.randint(3, 90, (2, 6))
    first = save_adapter(base_dir, tmp_path / "good", depth=1)
    expected = logits(first, input_ids)
    save_adapter(base_dir, tmp_path / "bad", depth=2)
    tensors = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "layers.1." not in k}, tmp_path / "bad" / "adapter_model.safetensors"
    )
    model = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "good")
    with pytest.raises(ValueError, match="missing tensor"):
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert not any(".bad" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model.eval(), input_ids), expected)


def test_invalid_config_value_in_a_saved_adapter_names_the_field(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path, depth=2)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["routing"] = "layer"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"TreeLoraConfig.routing must be one of \['token', 'block', 'sequence'\]"):
        PeftModel.from_pretrained(load_base(base_dir), tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "is not a readable safetensors file"),
        ("delete", "No adapter_model.safetensors or adapter_model.bin in"),
        ("pickle", "cannot be read as tensors only.*never unpickles code"),
    ],
)
def test_unreadable_weights_are_refused_before_the_model_is_touched(base_dir, tmp_path, damage, message):
    save_adapter(base_dir, tmp_path, depth=2, routing="sequence")
    weights = tmp_path / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "delete":
        weights.unlink()
    else:
        weights.unlink()
        (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle of tensors")
    base = load_base(base_dir)
    for p in base.parameters():
        p.requires_grad_(True)
    input_ids = torch.randint(3, 90, (2, 6))
    reference = logits(base, input_ids)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_left_as_it_was(base, reference, input_ids)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"peft_type": "TREELORA", "depth": ', "is not valid JSON"),
        ("", "is empty"),
        ('[{"peft_type": "TREELORA"}]', "holds a JSON list, not an object"),
        ('{"depth": 2}', 'has no "peft_type"'),
        ('{"peft_type": "LORA", "r": 2}', "says \"peft_type\": 'LORA', so it is no TreeLoRA adapter"),
    ],
    ids=["invalid JSON", "empty", "a list", "no peft_type", "another peft_type"],
)
def test_a_config_file_that_is_no_treelora_config_is_refused_naming_the_file(base_dir, tmp_path, content, message):
    from peft_tree_lora import TreeLoraConfig

    save_adapter(base_dir, tmp_path, depth=1)
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError) as error:
        TreeLoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(error.value) and message in str(error.value)
    if '"LORA"' in content:
        return  # for PEFT that is a LoRA config, which PeftModel.from_pretrained loads as one
    base = load_base(base_dir)
    with pytest.raises((ValueError, TypeError, KeyError)):  # PEFT reads the file first, with errors of its own
        PeftModel.from_pretrained(base, tmp_path)
    assert not adapter_layers(base)


def rewrite_weights(folder, change):
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.treelora_B"))
    tensors[key] = change(tensors[key])
    save_file(tensors, weights)


def test_nan_or_inf_in_saved_weights_loads_with_a_warning_naming_the_tensor(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path, depth=1)
    rewrite_weights(tmp_path, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    with pytest.warns(UserWarning, match=r"NaN or inf value\(s\) in model.layers.0.self_attn.q_proj.treelora_B"):
        model = PeftModel.from_pretrained(load_base(base_dir), tmp_path)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_integer_tensors_in_saved_weights_are_refused_naming_tensor_and_type(base_dir, tmp_path, dtype):
    save_adapter(base_dir, tmp_path, depth=1)
    rewrite_weights(tmp_path, lambda t: (t * 100).to(dtype))
    base = load_base(base_dir)
    for p in base.parameters():
        p.requires_grad_(True)
    input_ids = torch.randint(3, 90, (2, 6))
    reference = logits(base, input_ids)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"layers.0.self_attn.q_proj.treelora_B is a {name} tensor; .* floating"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_left_as_it_was(base, reference, input_ids)


def test_a_reloaded_adapter_saves_the_same_config_again(base_dir, tmp_path):
    save_adapter(base_dir, tmp_path / "first", depth=2, routing="sequence")
    PeftModel.from_pretrained(load_base(base_dir), tmp_path / "first").save_pretrained(tmp_path / "second")
    first = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    second = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert first == second


def test_an_adapter_saved_without_safetensors_loads_with_the_same_outputs(base_dir, tmp_path):
    model = save_adapter(base_dir, tmp_path, depth=2, routing="token", safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    input_ids = torch.randint(3, 90, (2, 6))
    reloaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model.eval(), input_ids))


def model_state(model):
    """Everything a refused load must leave alone: the module tree, the active adapters, what trains."""
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "active": list(model.active_adapters),
        "adapters": list(model.peft_config),
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "counts": model.base_model.parameter_counts(),
    }


@pytest.mark.parametrize("bad_routing", ROUTINGS)
@pytest.mark.parametrize("made_by", ["get_peft_model", "from_pretrained"])
def test_a_refused_load_adapter_leaves_the_model_exactly_as_it_was(base_dir, tmp_path, bad_routing, made_by):
    save_adapter(base_dir, tmp_path / "good", depth=1, routing="token")
    other = trained_looking(tree_model(make_tiny_llama(intermediate_size=48), depth=2, routing=bad_routing))
    other.save_pretrained(tmp_path / "bad")
    if made_by == "get_peft_model":
        model = save_adapter(base_dir, tmp_path / "unused", depth=1, routing="token")
    else:
        model = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "good")
    input_ids = torch.randint(3, 90, (2, 6))
    before, reference = model_state(model), logits(model.eval(), input_ids)
    with pytest.raises(ValueError, match="does not fit this model"):
        model.load_adapter(tmp_path / "bad", adapter_name="bad", is_trainable=True)
    assert model_state(model) == before
    torch.testing.assert_close(logits(model, input_ids), reference)
    model.load_adapter(tmp_path / "good", adapter_name="again")  # and the model still takes adapters that fit
    assert list(model.peft_config) == ["default", "again"]


SAVE_KILLED_MID_SWAP = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import trained_looking, tree_model
from transformers import LlamaForCausalLM
from peft_tree_lora.app.runner import save_atomically

model = trained_looking(tree_model(LlamaForCausalLM.from_pretrained({base!r}), depth=1), seed=7)
model.save_pretrained({reference!r})  # what the killed save was writing
real_replace, done = os.replace, []

def replace_then_die(source, destination):
    if len(done) == {renames}:
        os._exit(9)
    done.append(source)
    real_replace(source, destination)

os.replace = replace_then_die
save_atomically(model, Path({target!r}))
"""


@pytest.mark.parametrize(("renames_before_kill", "survivor"), [(1, "old"), (2, "new")])
def test_an_adapter_whose_save_was_killed_loads_as_the_old_or_the_new_one_whole(
    base_dir, tmp_path, renames_before_kill, survivor
):
    from peft_tree_lora.integrations.files import tree_adapter_config

    target, reference = tmp_path / "adapter", tmp_path / "new"
    save_adapter(base_dir, target, depth=1)
    shutil.copytree(target, tmp_path / "old")
    script = SAVE_KILLED_MID_SWAP.format(
        tests=str(Path(__file__).parent),
        base=str(base_dir),
        reference=str(reference),
        target=str(target),
        renames=renames_before_kill,
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    tree_adapter_config(target)  # what `tree-lora inspect` and `generate` read first: it finishes the swap
    input_ids = torch.randint(3, 90, (2, 6))
    got = logits(PeftModel.from_pretrained(load_base(base_dir), target).eval(), input_ids)
    expected = logits(PeftModel.from_pretrained(load_base(base_dir), tmp_path / survivor).eval(), input_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "new", "old"], "staging folders were kept"


def test_saving_writes_the_target_modules_in_one_order_whatever_the_hash_seed(tmp_path):
    """A set's iteration order follows the string hash, which Python salts per process: two processes saving the same
    adapter must still write the same file."""
    script = (
        "import sys, peft_tree_lora\n"
        "from peft_tree_lora import TreeLoraConfig\n"
        "names = [f'layers.{i}.{m}' for i in range(4) for m in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj')]\n"
        "TreeLoraConfig(depth=2, target_modules=names).save_pretrained(sys.argv[1])\n"
    )
    written = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env)
        written.append((out / "adapter_config.json").read_text())
    assert written[0] == written[1] == written[2]
    assert json.loads(written[0])["target_modules"] == sorted(json.loads(written[0])["target_modules"])
