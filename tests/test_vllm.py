"""examples/vllm_serve.py: exported sequence-routed leaves served by vLLM as `LoRARequest`s give the tree's greedy
tokens. The routing and the import rule are checked everywhere; the vLLM run needs vLLM, in this interpreter or in
the one `TREE_LORA_VLLM_PYTHON` names (vLLM brings its own torch, so it usually lives in a venv of its own)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_tiny_llama
from test_export import save_base_with_tokenizer, sequence_tree, spread_prompts
from transformers import AutoModelForCausalLM

from peft_tree_lora import TreeLoraSequenceRouter
from peft_tree_lora.integrations.export import export_leaves

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vllm_serve.py"
VLLM_PYTHON = os.environ.get("TREE_LORA_VLLM_PYTHON", sys.executable)
EOS = 2
NEW_TOKENS = 6


def vllm_importable() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([VLLM_PYTHON, "-c", probe], capture_output=True).returncode == 0


def example_module():
    spec = importlib.util.spec_from_file_location("vllm_serve", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # vllm itself is imported only when a server starts
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama (head size 32, which vLLM's CPU attention supports) with a tokenizer, a sequence-routed tree on
    it whose routers have a bias and pool only the first 4 tokens, and the tree's leaves exported."""
    root = tmp_path_factory.mktemp("vllm")
    save_base_with_tokenizer(
        root / "base", make_tiny_llama(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    )
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    model = sequence_tree(base=base, sequence_route_tokens=4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TreeLoraSequenceRouter):
                for router in module.treelora_router.values():
                    router.bias.normal_(0.0, 0.3, generator=generator)
    export_leaves(model, root / "exported")
    return root, model


def prompts_on_several_leaves(model) -> tuple[torch.Tensor, list[int]]:
    """Rows that open with 4 copies of one token (so they spread over the leaves) and go on with other tokens, which
    the router must not pool (it reads the first 4 only)."""
    tails = torch.randint(3, VOCAB, (24, 3), generator=torch.Generator().manual_seed(5))
    candidates = torch.cat([spread_prompts(24, 4), tails], dim=1)
    routes = model.base_model.leaf_routes(candidates)["sequence"].tolist()
    chosen = [routes.index(leaf) for leaf in sorted(set(routes))]
    assert len(chosen) >= 2, "the prompts should reach several leaves for the test to mean anything"
    return candidates[chosen], [routes[i] for i in chosen]


def up_to_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_the_vllm_example_imports_nothing_of_peft_or_peft_tree_lora():
    tree = ast.parse(EXAMPLE.read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "vllm" in imported and not [name for name in imported if name.split(".")[0] in ("peft", "peft_tree_lora")]


def test_the_vllm_example_routes_each_prompt_to_the_leaf_the_tree_picks(exported):
    root, model = exported
    serve = example_module()
    spec, router = serve.load_router(root / "exported")
    embeddings = serve.load_embedding_matrix(root / "base", spec["embedding_module"])
    prompts, leaves = prompts_on_several_leaves(model)
    assert [serve.pick_leaf(spec, router, embeddings[ids]) for ids in prompts] == leaves


@pytest.mark.skipif(not vllm_importable(), reason=f"vllm is not importable by {VLLM_PYTHON} (TREE_LORA_VLLM_PYTHON)")
def test_vllm_serving_the_routed_leaf_gives_the_trees_greedy_tokens(exported):
    root, model = exported
    prompts, leaves = prompts_on_several_leaves(model)
    expected = []
    for ids, leaf in zip(prompts, leaves):
        with torch.no_grad():
            generated = model.generate(input_ids=ids[None], max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append({"leaf": leaf, "token_ids": up_to_eos(generated[0, ids.shape[0] :].tolist())})
    command = [VLLM_PYTHON, str(EXAMPLE), str(root / "exported"), "--base", str(root / "base")]
    command += ["--max-new-tokens", str(NEW_TOKENS)]
    for ids in prompts:
        command += ["--prompt", " ".join(f"w{t}" for t in ids.tolist())]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    served = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [{"leaf": s["leaf"], "token_ids": up_to_eos(s["token_ids"])} for s in served] == expected
