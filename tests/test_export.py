"""Leaf export for multi-LoRA servers, the router recipe, the example router script, and pinned-leaf merging."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_tiny_gpt2, make_tiny_llama
from helpers import logits, trained_looking, tree_model
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_tree_lora import TreeLoraLinear, TreeLoraSequenceRouter
from peft_tree_lora.integrations.export import (
    configure_parser,
    export_leaf,
    export_leaves,
    route_from_embeddings,
    run,
)
from peft_tree_lora.tuner.errors import TreeLoraUsageError

ROOT = Path(__file__).resolve().parents[1]


BUILDERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
DEPTH = 2


def sequence_tree(arch: str = "llama", depth: int = DEPTH, base: torch.nn.Module | None = None, **config) -> PeftModel:
    """A sequence-routed tree whose leaves all differ and whose router sends different prompts to different leaves
    (zero router bias: the tiny models' embeddings are too small for the sign of a random bias not to decide)."""
    base = BUILDERS[arch]() if base is None else base
    model = trained_looking(tree_model(base, depth=depth, routing="sequence", init_lora_weights=False, **config))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraSequenceRouter):
                for router in module.treelora_router.values():
                    router.bias.zero_()
    return model.eval()


def spread_prompts(batch: int = 16, length: int = 8) -> torch.Tensor:
    """Each row repeats one token, so rows pool to different embeddings and take different leaves."""
    return torch.arange(3, 3 + batch).unsqueeze(1).repeat(1, length)


def plain_lora(arch: str, directory: Path) -> PeftModel:
    return PeftModel.from_pretrained(BUILDERS[arch](), str(directory)).eval()


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tree-lora export")
    configure_parser(parser)
    return parser.parse_args(list(argv))


# --- export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_exported_leaf_loaded_by_plain_peft_equals_the_tree_on_that_leaf(arch, tmp_path):
    model = sequence_tree(arch)
    prompts = spread_prompts()
    routes = model.base_model.leaf_routes(prompts)["sequence"]
    tree_logits = logits(model, prompts)
    assert len(routes.unique()) >= 2, "the prompts should reach several leaves for this test to mean anything"
    export_leaves(model, tmp_path / "out")
    for leaf in range(2**DEPTH):
        lora_logits = logits(plain_lora(arch, tmp_path / "out" / f"leaf_{leaf}"), prompts)
        with model.base_model.pinned_leaf(leaf):
            torch.testing.assert_close(lora_logits, logits(model, prompts), rtol=1e-5, atol=1e-5)
        routed_here = routes == leaf
        torch.testing.assert_close(lora_logits[routed_here], tree_logits[routed_here], rtol=1e-5, atol=1e-5)


def test_an_exported_leaf_is_a_standard_peft_lora_directory(tmp_path):
    model = sequence_tree()
    export_leaf(model, 1, tmp_path / "leaf")
    config = json.loads((tmp_path / "leaf" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["modules_to_save"] is None
    assert not config["use_dora"] and not config["use_rslora"]
    with safe_open(str(tmp_path / "leaf" / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in keys}
    assert keys and all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in keys)
    layers = [m for m in model.modules() if isinstance(m, TreeLoraLinear)]
    assert len(keys) == 2 * len(layers)
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    assert shapes[f"{q_proj}.lora_A.weight"] == (4, 32)
    assert shapes[f"{q_proj}.lora_B.weight"] == (32, 4)


def test_export_from_a_saved_directory_writes_the_same_leaves_as_from_the_model(tmp_path):
    model = sequence_tree()
    model.save_pretrained(tmp_path / "adapter")
    export_leaves(model, tmp_path / "from_model")
    export_leaves(tmp_path / "adapter", tmp_path / "from_dir")
    for name in ["router.safetensors"] + [f"leaf_{k}/adapter_model.safetensors" for k in range(2**DEPTH)]:
        from_model, from_dir = load_file(tmp_path / "from_model" / name), load_file(tmp_path / "from_dir" / name)
        assert from_model.keys() == from_dir.keys()
        for key in from_model:
            assert torch.equal(from_model[key], from_dir[key]), (name, key)


def test_the_router_json_recipe_picks_the_leaf_the_tree_picks_with_padding(tmp_path):
    model = sequence_tree()
    prompts = spread_prompts()
    attention_mask = torch.ones_like(prompts)
    attention_mask[::2, :3] = 0  # left padding on every other row: pooling must skip it
    prompts = prompts.masked_fill(attention_mask == 0, 0)
    export_leaves(model, tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "router.json").read_text())
    router = load_file(tmp_path / "out" / spec["weights"])
    embeds = make_tiny_llama().get_input_embeddings()(prompts)
    picked = route_from_embeddings(spec, router, embeds, attention_mask)
    assert torch.equal(picked, model.base_model.leaf_routes(prompts, attention_mask)["sequence"])
    assert spec["leaves"] == [f"leaf_{k}" for k in range(4)]
    assert (spec["depth"], spec["embedding_module"], spec["hidden_size"]) == (DEPTH, "model.embed_tokens", 32)


@pytest.mark.parametrize("routing", ["token", "block"])
@pytest.mark.parametrize("depth", [1, 2])
def test_export_refuses_token_routing_saying_why_and_what_to_use(routing, depth, tmp_path):
    model = tree_model(make_tiny_llama(), depth=depth, routing=routing)
    for export in (lambda: export_leaves(model, tmp_path / "all"), lambda: export_leaf(model, 0, tmp_path / "one")):
        with pytest.raises(TreeLoraUsageError, match="routes by token") as refusal:
            export()
        assert f"routing={routing!r}" in str(refusal.value) and "routing='sequence'" in str(refusal.value)
        assert "no single LoRA" in str(refusal.value)
    assert not (tmp_path / "all").exists() and not (tmp_path / "one").exists()


def test_a_depth_zero_token_tree_exports_as_the_lora_it_is(tmp_path):
    model = trained_looking(tree_model(make_tiny_llama(), depth=0, routing="token", init_lora_weights=False)).eval()
    export_leaves(model, tmp_path / "out")
    prompts = spread_prompts(4)
    torch.testing.assert_close(
        logits(plain_lora("llama", tmp_path / "out" / "leaf_0"), prompts), logits(model, prompts)
    )
    spec = json.loads((tmp_path / "out" / "router.json").read_text())
    assert (spec["depth"], spec["leaves"], spec["weights"]) == (0, ["leaf_0"], None)


@pytest.mark.parametrize("leaf", [-1, 4, True, "1"])
def test_a_leaf_index_out_of_range_is_refused_naming_the_range(leaf, tmp_path):
    with pytest.raises(TreeLoraUsageError, match=r"4 leaves \(depth 2\), numbered 0 to 3"):
        export_leaf(sequence_tree(), leaf, tmp_path / "leaf")
    assert not (tmp_path / "leaf").exists()


def test_export_refuses_modules_to_save(tmp_path):
    model = sequence_tree(modules_to_save=["lm_head"])
    with pytest.raises(TreeLoraUsageError, match="modules_to_save"):
        export_leaves(model, tmp_path / "out")


def test_export_never_writes_into_a_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TreeLoraUsageError, match="already exists"):
        export_leaves(sequence_tree(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "notes.txt").read_text() == "mine"


def test_the_command_line_exports_all_leaves_or_one(tmp_path, capsys):
    model = sequence_tree()
    model.save_pretrained(tmp_path / "adapter")
    assert run(parse_cli(str(tmp_path / "adapter"), str(tmp_path / "all"))) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "leaf_0",
        "leaf_1",
        "leaf_2",
        "leaf_3",
        "router.json",
        "router.safetensors",
    ]
    assert run(parse_cli(str(tmp_path / "adapter"), str(tmp_path / "one"), "--leaf", "3")) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    one, leaf_3 = (
        tmp_path / "one" / "adapter_model.safetensors",
        tmp_path / "all" / "leaf_3" / "adapter_model.safetensors",
    )
    assert torch.equal(load_file(one)[key], load_file(leaf_3)[key])
    assert "4 PEFT LoRA adapters" in capsys.readouterr().out
    with pytest.raises(TreeLoraUsageError, match="no adapter_config.json"):
        run(parse_cli(str(tmp_path / "missing"), str(tmp_path / "x")))


# --- the example router script --------------------------------------------------------------------------------


def save_base_with_tokenizer(directory: Path, model: torch.nn.Module | None = None) -> None:
    """The tiny Llama (or `model`) plus a word-level tokenizer ("w3 w17 ..."), saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    (make_tiny_llama() if model is None else model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_serve_router_example_routes_each_prompt_to_the_tree_leaf_and_generates_what_the_tree_does(
    tmp_path, monkeypatch, capsys
):
    save_base_with_tokenizer(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = sequence_tree(base=base)
    model.save_pretrained(tmp_path / "adapter")
    assert run(parse_cli(str(tmp_path / "adapter"), str(tmp_path / "exported"))) == 0

    candidates = spread_prompts(24, 5)
    routes = model.base_model.leaf_routes(candidates)["sequence"].tolist()
    chosen = [routes.index(leaf) for leaf in sorted(set(routes))][:3]
    assert len(chosen) >= 2
    prompts = [" ".join(f"w{t}" for t in candidates[i].tolist()) for i in chosen]
    expected = []
    for i in chosen:
        with torch.no_grad():
            generated = model.generate(input_ids=candidates[i : i + 1], max_new_tokens=6, do_sample=False)
        expected.append({"leaf": routes[i], "token_ids": generated[0, 5:].tolist()})

    argv = ["serve_router.py", str(tmp_path / "exported"), "--base", str(tmp_path / "base"), "--max-new-tokens", "6"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    runpy.run_path(str(ROOT / "examples" / "serve_router.py"), run_name="__main__")
    served = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [{"leaf": s["leaf"], "token_ids": s["token_ids"]} for s in served] == expected


def test_serve_router_example_imports_nothing_from_peft_tree_lora():
    tree = ast.parse((ROOT / "examples" / "serve_router.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "peft" in imported and not [name for name in imported if name.startswith("peft_tree_lora")]


def test_serve_router_pick_leaf_follows_the_exported_recipe(tmp_path):
    spec_path = ROOT / "examples" / "serve_router.py"
    module_spec = importlib.util.spec_from_file_location("serve_router", spec_path)
    serve_router = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(serve_router)
    model = sequence_tree()
    export_leaves(model, tmp_path / "out")
    spec, router = serve_router.load_router(tmp_path / "out")
    prompts = spread_prompts()
    embeds = make_tiny_llama().get_input_embeddings()(prompts)
    picked = serve_router.pick_leaf(spec, router, embeds, None)
    assert torch.equal(picked, model.base_model.leaf_routes(prompts)["sequence"])


ROUTE_WITHOUT_PEFT = """
import importlib.util, json, sys, torch
sys.modules["peft"] = None  # any `import peft` now fails, as where only vLLM is installed
paths = json.loads(sys.argv[1])
module_spec = importlib.util.spec_from_file_location("serve_router", paths["script"])
serve_router = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(serve_router)
spec, router = serve_router.load_router(paths["exported"])
picked = serve_router.pick_leaf(spec, router, torch.load(paths["embeds"]), None)
print("PICKED " + json.dumps(picked.tolist()))
"""


def test_serve_router_example_routes_prompts_where_peft_cannot_be_imported(tmp_path):
    model = sequence_tree()
    export_leaves(model, tmp_path / "exported")
    prompts = spread_prompts()
    torch.save(make_tiny_llama().get_input_embeddings()(prompts).detach(), tmp_path / "embeds.pt")
    paths = {"script": str(ROOT / "examples" / "serve_router.py"), "exported": str(tmp_path / "exported")}
    paths["embeds"] = str(tmp_path / "embeds.pt")
    done = subprocess.run(
        [sys.executable, "-c", ROUTE_WITHOUT_PEFT, json.dumps(paths)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    picked = json.loads(done.stdout.split("PICKED ", 1)[1])
    assert picked == model.base_model.leaf_routes(prompts)["sequence"].tolist()


def test_serve_router_pick_leaf_pools_the_route_tokens_and_normalises_as_the_recipe_says(tmp_path):
    spec_path = ROOT / "examples" / "serve_router.py"
    module_spec = importlib.util.spec_from_file_location("serve_router", spec_path)
    serve_router = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(serve_router)
    model = sequence_tree(sequence_route_tokens=4)  # router_input_norm is on by default
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraSequenceRouter):
                for router in module.treelora_router.values():
                    router.bias.normal_(0.0, 0.3, generator=generator)  # a bias: the input's scale now matters
    export_leaves(model, tmp_path / "out")
    spec, router = serve_router.load_router(tmp_path / "out")
    tails = torch.randint(3, VOCAB, (16, 3), generator=torch.Generator().manual_seed(5))
    prompts = torch.cat([spread_prompts(16, 4), tails], dim=1)  # only the first 4 tokens route
    embeds = make_tiny_llama().get_input_embeddings()(prompts)
    routes = model.base_model.leaf_routes(prompts)["sequence"]
    assert len(routes.unique()) >= 2
    assert torch.equal(serve_router.pick_leaf(spec, router, embeds, None), routes)


# --- merging a pinned leaf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merging_a_pinned_leaf_gives_a_plain_model_equal_to_the_tree_on_that_leaf(arch, tmp_path):
    model = sequence_tree(arch)
    prompts = spread_prompts(6)
    model.base_model.pin_leaf(3)
    pinned_logits = logits(model, prompts)
    merged = model.merge_and_unload()
    assert type(merged) is type(BUILDERS[arch]())
    assert not any(isinstance(m, (TreeLoraLinear, TreeLoraSequenceRouter)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, prompts), pinned_logits, rtol=1e-5, atol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, prompts), pinned_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["sequence", "token", "block"])
@pytest.mark.parametrize("depth", [1, 2])
def test_merging_an_unpinned_tree_is_refused_and_changes_nothing(routing, depth):
    model = tree_model(make_tiny_llama(), depth=depth, routing=routing, init_lora_weights=False).eval()
    prompts = spread_prompts(4)
    before = logits(model, prompts)
    with pytest.raises(ValueError, match=rf"depth {depth}.*no single weight update.*pin_leaf"):
        model.merge_and_unload()
    torch.testing.assert_close(logits(model, prompts), before, rtol=0, atol=0)
