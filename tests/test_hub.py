"""TreeLoRA on the Hub: push, load back in a fresh process, revisions, subfolders, the model card, bad input.

Everything talks HTTP to `tests/hub_server.py` on 127.0.0.1. `huggingface_hub` reads `HF_ENDPOINT` when it is
imported, which this process has already done (through peft), so pushing and loading run in fresh processes: one
that pushes, then one that loads with an empty cache and compares outputs with those computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model
from hub_server import HubServer
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_tree_lora import TreeLoraConfig
from peft_tree_lora.integrations.export import export_leaf
from peft_tree_lora.integrations.hub import from_pretrained, save_pretrained, summarize_adapter
from peft_tree_lora.integrations.hub.card import install_lines
from peft_tree_lora.tuner.errors import TreeLoraUsageError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = torch.randint(3, 90, (3, 10), generator=torch.Generator().manual_seed(7))

# Runs in a fresh process with HF_ENDPOINT pointing at the test Hub. argv[1]: JSON with the paths.
PUSH_SCRIPT = """
import json, os, sys
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
import peft_tree_lora
from peft_tree_lora.tuner.errors import TreeLoraUsageError
from peft_tree_lora.integrations.hub import push_to_hub

paths = json.loads(sys.argv[1])
def tree(adapter):
    base = AutoModelForCausalLM.from_pretrained(paths["base"])
    return PeftModel.from_pretrained(base, paths[adapter])

report = {"errors": {}}
api = HfApi()
# a card the owner wrote before the first push: it must survive, updated
api.create_repo("tester/tree")
api.upload_file(path_or_fileobj=paths["own_card"], path_in_repo="README.md", repo_id="tester/tree")
push_to_hub(tree("adapter_main"), "tester/tree")
push_to_hub(tree("adapter_v2"), "tester/tree", revision="v2")
push_to_hub(tree("adapter_sub"), "tester/tree", subfolder="trees/small")
# the transformers path, exactly as for a LoRA
tree("adapter_main").push_to_hub("tester/tree-plain")
lora = get_peft_model(AutoModelForCausalLM.from_pretrained(paths["base"]), LoraConfig(r=4, target_modules=["q_proj"]))
lora.push_to_hub("tester/lora")
# the Trainer's path: its card takes the tags the tree put on the base model (model_tags)
from transformers import Trainer, TrainingArguments
trained = tree("adapter_main")
trained.base_model.model.config._name_or_path = "tester/tiny-llama"  # the Hub refuses a local base_model path
arguments = TrainingArguments(
    paths["trainer_output"], hub_model_id="tester/tree-trainer", use_cpu=True, report_to="none"
)
Trainer(model=trained, args=arguments).push_to_hub()
api.create_repo("tester/no-adapter")
# an exported leaf travels the Hub as the plain LoRA it is
api.create_repo("tester/tree-leaf")
api.upload_folder(folder_path=paths["leaf"], repo_id="tester/tree-leaf")

for case, repo_id in [("empty", ""), ("double_dash", "tester/bad--name"), ("too_deep", "a/b/c")]:
    try:
        push_to_hub(tree("adapter_main"), repo_id)
    except TreeLoraUsageError as error:
        report["errors"][case] = str(error)
os.environ.pop("HF_TOKEN")
try:
    push_to_hub(tree("adapter_main"), "tester/never-created")
except TreeLoraUsageError as error:
    report["errors"]["no_token"] = str(error)
print("REPORT " + json.dumps(report))
"""

LOAD_SCRIPT = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

paths = json.loads(sys.argv[1])
prompts = torch.tensor(paths["prompts"])
def base():
    return AutoModelForCausalLM.from_pretrained(paths["base"])
def run(model):
    with torch.no_grad():
        return model.eval()(input_ids=prompts).logits.contiguous()

# plain PEFT, before peft_tree_lora is imported: the exported leaf needs nothing of this package
outputs = {"leaf": run(PeftModel.from_pretrained(base(), "tester/tree-leaf"))}
report = {"errors": {}, "peft_tree_lora_imported_for_leaf": "peft_tree_lora" in sys.modules}

import peft_tree_lora
from peft_tree_lora.tuner.errors import TreeLoraUsageError
from peft_tree_lora.integrations.hub import from_pretrained

outputs.update({
    "peft": run(PeftModel.from_pretrained(base(), "tester/tree")),
    "auto": run(AutoPeftModelForCausalLM.from_pretrained("tester/tree")),
    "revision": run(PeftModel.from_pretrained(base(), "tester/tree", revision="v2")),
    "subfolder": run(PeftModel.from_pretrained(base(), "tester/tree", subfolder="trees/small")),
    "plain_push": run(PeftModel.from_pretrained(base(), "tester/tree-plain")),
    "ours": run(from_pretrained("tester/tree", revision="v2")),
})
save_file(outputs, paths["outputs"])
for case, repo_id, kwargs in [
    ("lora", "tester/lora", {}),
    ("no_adapter", "tester/no-adapter", {}),
    ("no_repo", "tester/missing", {}),
    ("no_revision", "tester/tree", {"revision": "nope"}),
]:
    try:
        from_pretrained(repo_id, base(), **kwargs)
    except TreeLoraUsageError as error:
        report["errors"][case] = str(error)
print("REPORT " + json.dumps(report))
"""


def hub_process(script: str, hub: HubServer, home: Path, paths: dict, token: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT)
    env["PEFT_TREE_LORA_NO_AUTOLOAD"] = "1"  # the scripts show what works before and after `import peft_tree_lora`
    if token:
        env["HF_TOKEN"] = "hf_dummy_token_for_tests"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """Three different TreeLoRA adapters pushed to one repo (main, branch v2, subfolder), then loaded back in a
    fresh process. Returns what both processes reported and the outputs expected for each adapter."""
    work = tmp_path_factory.mktemp("hub")
    make_tiny_llama().save_pretrained(work / "base")
    expected = {}
    adapters = {"adapter_main": ("token", 0), "adapter_v2": ("token", 1), "adapter_sub": ("sequence", 2)}
    for name, (routing, seed) in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(work / "base")
        model = trained_looking(tree_model(base, depth=2, routing=routing, init_lora_weights=False), seed=seed)
        model.save_pretrained(work / name)
        expected[name] = logits(model.eval(), PROMPTS)
        if routing == "sequence":
            export_leaf(model, 1, work / "leaf")
            with model.base_model.pinned_leaf(1):
                expected["leaf"] = logits(model, PROMPTS)
    (work / "own_card.md").write_text("---\ntags:\n- my-own-tag\nlicense: mit\n---\n\n# My tree\n\nNotes I wrote.\n")
    paths = {name: str(work / name) for name in [*adapters, "base", "leaf"]}
    paths.update(own_card=str(work / "own_card.md"), outputs=str(work / "outputs.safetensors"))
    paths["trainer_output"] = str(work / "trainer_output")
    paths["prompts"] = PROMPTS.tolist()
    pushed = hub_process(PUSH_SCRIPT, hub, work / "push_home", paths)
    loaded = hub_process(LOAD_SCRIPT, hub, work / "load_home", paths)
    outputs = load_file(work / "outputs.safetensors")
    return {"pushed": pushed, "loaded": loaded, "outputs": outputs, "work": work, **expected}


def card(hub: HubServer, repo_id: str, path: str = "README.md", revision: str = "main") -> ModelCard:
    return ModelCard(hub.files(repo_id, revision)[path].decode())


# --- push and load --------------------------------------------------------------------------------------------


def test_pushed_adapter_loads_in_a_fresh_process_with_identical_outputs(published):
    assert torch.equal(published["outputs"]["peft"], published["adapter_main"])


def test_auto_peft_model_loads_the_pushed_adapter_with_its_base_model(published):
    assert torch.equal(published["outputs"]["auto"], published["adapter_main"])


def test_revision_loads_the_adapter_pushed_to_that_branch(published):
    assert torch.equal(published["outputs"]["revision"], published["adapter_v2"])
    assert torch.equal(published["outputs"]["ours"], published["adapter_v2"])
    assert not torch.equal(published["adapter_v2"], published["adapter_main"])


def test_subfolder_loads_the_adapter_pushed_there(hub, published):
    assert torch.equal(published["outputs"]["subfolder"], published["adapter_sub"])
    assert {"trees/small/adapter_config.json", "trees/small/adapter_model.safetensors"} <= set(
        hub.files("tester/tree")
    )


def test_model_push_to_hub_uploads_a_tree_exactly_as_a_lora(hub, published):
    assert torch.equal(published["outputs"]["plain_push"], published["adapter_main"])
    assert set(hub.files("tester/tree-plain")) == set(hub.files("tester/lora"))
    tree_config = json.loads(hub.files("tester/tree-plain")["adapter_config.json"])
    assert tree_config["peft_type"] == "TREELORA"


def test_an_exported_leaf_pushed_as_lora_loads_with_peft_alone_and_equals_the_tree_on_that_leaf(published):
    assert not published["loaded"]["peft_tree_lora_imported_for_leaf"]
    torch.testing.assert_close(published["outputs"]["leaf"], published["leaf"], rtol=1e-5, atol=1e-5)


def test_the_test_hub_was_asked_only_for_routes_it_serves(hub, published):
    assert hub.state.unknown_requests == []


# --- the model card -------------------------------------------------------------------------------------------


def test_pushed_card_has_tree_tags_shape_counts_and_load_lines(hub, published):
    pushed = card(hub, "tester/tree")
    assert {"peft", "tree-lora", "peft-tree-lora"} <= set(pushed.data.tags)
    assert pushed.data.library_name == "peft"
    counts = summarize_adapter(published["work"] / "adapter_main")
    text = pushed.text
    assert "peft-tree-lora is not on PyPI" in text and "pip install /path/to/peft-tree-lora" in text
    assert "pip install peft-tree-lora\n" not in text and "import peft_tree_lora" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("tester/tree")' in text
    assert "depth 2: 4 LoRA leaves and 3 routers" in text
    assert "| rank per leaf | 4 (lora_alpha 8) |" in text
    assert "| routing | token:" in text
    assert "`down_proj`, `gate_proj`, `k_proj`, `o_proj`, `q_proj`, `up_proj`, `v_proj` (14 layers" in text
    assert f"| trainable parameters | {counts.total_parameters:,} " in text
    assert f"| active per token | {counts.active_per_token:,} " in text


def test_card_install_line_points_at_the_source_repository_when_one_is_known():
    line = install_lines("https://example.org/you/peft-tree-lora")
    assert 'pip install "peft-tree-lora @ git+https://example.org/you/peft-tree-lora"' in line
    assert "not on PyPI" in line and "not on PyPI" in install_lines(None)


def test_trainer_push_to_hub_card_carries_the_tree_tags(hub, published):
    pushed = card(hub, "tester/tree-trainer")
    assert {"tree-lora", "peft-tree-lora"} <= set(pushed.data.tags)
    assert json.loads(hub.files("tester/tree-trainer")["adapter_config.json"])["peft_type"] == "TREELORA"


def test_plain_peft_save_pretrained_card_carries_the_tree_tags(tmp_path):
    model = tree_model(make_tiny_llama(), depth=1, r=2)
    model.save_pretrained(tmp_path)  # PEFT's own card, no TreeLoRA section
    saved = ModelCard.load(tmp_path / "README.md")
    assert saved.data.library_name == "peft"
    assert {"tree-lora", "peft-tree-lora"} <= set(saved.data.tags)


def test_unload_takes_the_tree_tags_off_the_base_model():
    base = make_tiny_llama()
    base.add_model_tags(["my-tag"])
    model = tree_model(base, depth=1, r=2)
    assert model.model_tags == ["my-tag", "tree-lora", "peft-tree-lora"]
    assert model.unload().model_tags == ["my-tag"]


def test_existing_card_is_updated_not_overwritten(hub, published):
    pushed = card(hub, "tester/tree")
    assert "# My tree" in pushed.text and "Notes I wrote." in pushed.text
    assert "my-own-tag" in pushed.data.tags and pushed.data.license == "mit"
    assert pushed.text.count("<!-- BEGIN peft-tree-lora -->") == 1


def test_cards_pushed_to_a_revision_and_a_subfolder_say_how_to_load_from_there(hub, published):
    assert 'from_pretrained("tester/tree", revision="v2")' in card(hub, "tester/tree", revision="v2").text
    sub = card(hub, "tester/tree", path="trees/small/README.md")
    assert 'from_pretrained("tester/tree", subfolder="trees/small")' in sub.text
    assert "| routing | sequence:" in sub.text


def test_card_base_model_is_a_hub_id_or_absent_never_a_local_path(hub, published, tmp_path):
    # the fixture's base model was loaded from a local directory: the Hub would refuse it as base_model
    pushed = card(hub, "tester/tree")
    assert pushed.data.get("base_model") is None
    assert not [tag for tag in pushed.data.tags if tag.startswith("base_model:")]
    model = tree_model(make_tiny_llama(), depth=1)
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M"
    save_pretrained(model, tmp_path, save_embedding_layers=False)  # "auto" would look the base up on the Hub
    saved = ModelCard.load(tmp_path / "README.md")
    assert saved.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M" in saved.data.tags


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_saved_card_counts_equal_parameter_counts(routing, tmp_path):
    model = tree_model(make_tiny_llama(), depth=3, routing=routing, target_modules=["q_proj", "v_proj"])
    save_pretrained(model, tmp_path)
    counts = model.base_model.parameter_counts()
    summary = summarize_adapter(tmp_path)
    assert (summary.total_parameters, summary.active_per_token) == (counts["total"], counts["active_per_token"])
    text = (tmp_path / "README.md").read_text()
    assert f"| trainable parameters | {counts['total']:,} " in text
    assert f"| active per token | {counts['active_per_token']:,} " in text


def test_saving_again_replaces_the_tree_section_and_keeps_the_rest(tmp_path):
    model = tree_model(make_tiny_llama(), depth=1)
    save_pretrained(model, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n## Evaluation\n\nMy numbers.\n")
    bigger = tree_model(make_tiny_llama(), depth=2)
    save_pretrained(bigger, tmp_path)
    text = readme.read_text()
    assert "My numbers." in text
    assert text.count("<!-- BEGIN peft-tree-lora -->") == 1
    assert "depth 2: 4 LoRA leaves" in text and "depth 1:" not in text


def test_each_saved_adapter_gets_its_own_section(tmp_path):
    model = tree_model(make_tiny_llama(), depth=1)
    model.add_adapter("other", TreeLoraConfig(depth=2, r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    save_pretrained(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "<!-- BEGIN peft-tree-lora -->" in text and "<!-- BEGIN peft-tree-lora other -->" in text
    assert f'from_pretrained("{tmp_path}", subfolder="other")' in text


def test_a_config_saved_on_its_own_writes_no_card(tmp_path):
    TreeLoraConfig(depth=2, task_type="CAUSAL_LM").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]


# --- bad input ------------------------------------------------------------------------------------------------


def test_pushing_without_a_token_is_refused_before_anything_is_sent(hub, published):
    message = published["pushed"]["errors"]["no_token"]
    assert "needs a token" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert "tester/never-created" not in hub.state.repos


@pytest.mark.parametrize("case", ["empty", "double_dash", "too_deep"])
def test_an_invalid_repo_id_is_refused_naming_the_rules(case, published):
    message = published["pushed"]["errors"][case]
    assert "is not a valid Hub repo id" in message and "'owner/name'" in message


def test_loading_a_plain_lora_repo_as_treelora_is_refused(published):
    message = published["loaded"]["errors"]["lora"]
    assert "holds a LORA adapter, not a TreeLoRA one" in message


@pytest.mark.parametrize(
    "case, words",
    [
        ("no_adapter", "has no adapter_config.json"),
        ("no_repo", "No Hub repo 'tester/missing'"),
        ("no_revision", "has no revision 'nope'"),
    ],
)
def test_loading_a_repo_without_a_treelora_config_is_refused_saying_what_is_there(case, words, published):
    assert words in published["loaded"]["errors"][case]


def test_from_pretrained_checks_local_directories_too(tmp_path):
    get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(TreeLoraUsageError, match="holds a LORA adapter, not a TreeLoRA one"):
        from_pretrained(str(tmp_path / "lora"), make_tiny_llama())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TreeLoraUsageError, match="has no adapter_config.json"):
        from_pretrained(str(tmp_path / "empty"), make_tiny_llama())
    tree = trained_looking(tree_model(make_tiny_llama(), depth=1, init_lora_weights=False)).eval()
    tree.save_pretrained(tmp_path / "tree")
    loaded = from_pretrained(str(tmp_path / "tree"), make_tiny_llama())
    assert torch.equal(logits(loaded.eval(), PROMPTS), logits(tree, PROMPTS))
