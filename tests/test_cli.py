"""The `tree-lora` command line, end to end on a tiny Llama saved to disk and a small text file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_assets import save_tiny_model, write_sample_text
from conftest import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_tree_lora.app.cli import main

FAST = ["--seq-len", "16", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-blocks", "4", "--quiet"]
TREE = ["--depth", "2", "--rank", "4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": save_tiny_model(root / "tiny-model"),
        "text": write_sample_text(root / "sample.txt"),
        "root": root,
    }


@pytest.fixture(scope="module")
def trained(assets) -> Path:
    output = assets["root"] / "trained"
    code = main(
        ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE, "-o", str(output)]
    )
    assert code == 0
    return output


def test_train_saves_a_tree_adapter_that_peft_loads(trained, assets):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "TREELORA" and config["depth"] == 2 and config["r"] == 4
    run = json.loads((trained / "tree_lora_run.json").read_text())
    assert run["steps_done"] == 4
    assert [point[0] for point in run["eval_curve"]] == [0, 2, 4]
    assert run["eval_curve"][1][1] == 2 * 4 * 16  # tokens seen: steps x batch x sequence length
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(trained))
    assert model.base_model.parameter_counts()["total"] == run["trainable_params"]


def test_train_prints_a_summary_with_held_out_loss(assets, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE, "-o", str(output)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "held-out loss" in printed and "active per token" in printed and f"saved to {output}" in printed


def test_compare_writes_report_plots_and_a_table_of_three_runs(assets, tmp_path, capsys):
    output = tmp_path / "compare"
    argv = ["compare", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE, "-o", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("LoRA r=4", "TreeLoRA d=2 r=4", "LoRA r=16"):
        assert f"| {name} |" in printed
    report = (output / "report.md").read_text()
    assert "| LoRA r=4 |" in report and "![held-out loss](heldout_loss.png)" in report
    for picture in ("heldout_loss.png", "leaf_usage_treelora-d-2-r-4.png"):
        assert (output / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lora, tree, big_lora = json.loads((output / "results.json").read_text())
    routers_per_token = tree["active_params_per_token"] - lora["active_params_per_token"]
    assert 0 < routers_per_token < lora["active_params_per_token"]  # same compute per token, plus d router rows
    assert tree["trainable_params"] - big_lora["trainable_params"] > 0  # same leaves plus the routers
    assert lora["eval_curve"][0] == tree["eval_curve"][0] == big_lora["eval_curve"][0]  # same base, same data
    assert sum(sum(counts) for counts in tree["leaf_usage"].values()) > 0


def test_inspect_shows_shape_counts_routing_and_file_usage(trained, assets, capsys):
    assert main(["inspect", str(trained), "--text", "the king", "--file", str(assets["text"]), "--seq-len", "16"]) == 0
    printed = capsys.readouterr().out
    assert "depth 2, 4 leaves of rank 4" in printed
    assert "active per token" in printed
    assert "t:" in printed  # per-token leaves of the first module
    assert "layer 0" in printed and "layer 1" in printed


def test_generate_continues_the_prompt(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "the king", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_an_earlier_output_is_replaced_only_with_overwrite(trained, assets, capsys):
    argv = ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE, "-o", str(trained)]
    before = (trained / "adapter_model.safetensors").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_leaves_only_the_new_runs_files(trained, assets, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(trained, earlier)
    (earlier / "checkpoint-from-the-earlier-run.bin").write_text("stale")
    argv = ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE]
    assert main([*argv, "--overwrite", "-o", str(earlier)]) == 0
    assert sorted(p.name for p in earlier.iterdir()) == sorted(p.name for p in trained.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["earlier"], "the earlier output was left in a hidden folder"


def test_a_run_stopped_by_ctrl_c_exits_130_with_the_adapter_saved_whole(assets, tmp_path, monkeypatch, capsys):
    from peft_tree_lora.app import runner

    def ctrl_c_during_the_first_step(self, args, state, control, **kwargs):
        self.interrupted = True  # what the SIGINT handler does
        control.should_training_stop = True
        return control

    monkeypatch.setattr(runner._InterruptStopper, "on_step_end", ctrl_c_during_the_first_step)
    output = tmp_path / "out"
    argv = ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE]
    assert main([*argv, "-o", str(output)]) == 130
    assert "interrupted" in capsys.readouterr().err
    run = json.loads((output / "tree_lora_run.json").read_text())
    assert run["interrupted"] and run["steps_done"] == 1
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(output))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _bad_inputs(assets: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    model, text = str(assets["model"]), str(assets["text"])
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "TREELORA", "depth": 1}')
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "adapter_config.json").write_text('{"peft_type": "TREELORA", "depth": 1}')
    (tmp_path / "damaged" / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    out = str(tmp_path / "out")
    base = ["--model", model, "--data", text, *FAST]
    return {
        "missing model folder": (["train", "--model", str(tmp_path / "nowhere"), "--data", text, "-o", out], "model"),
        "unknown hub model": (
            ["train", "--model", "no-such-user-xyz/no-such-model", "--data", text, "-o", out],
            "model",
        ),
        "data without text": (
            ["train", "--model", model, "--data", str(tmp_path / "empty.txt"), "-o", out],
            "no text",
        ),
        "unknown hub dataset": (
            ["train", "--model", model, "--data", "no-such-user-xyz/no-data", "-o", out],
            "dataset",
        ),
        "missing data file": (["train", "--model", model, "--data", str(tmp_path / "none.txt"), "-o", out], "no data"),
        "depth out of range": (["train", *base, "--depth", "11", "-o", out], "--depth"),
        "zero steps": (["train", *base, "--steps", "0", "-o", out], "--steps"),
        "learning rate out of range": (["train", *base, "--lr", "3", "-o", out], "--lr"),
        "layers out of range": (["train", *base, "--layers", "5-9", "-o", out], "layers 0 to 1"),
        "unknown target module": (["train", *base, "--target-modules", "attn_zz", "-o", out], "q_proj"),
        "sequence longer than the model's context": (["train", *base, "--seq-len", "4096", "-o", out], "context"),
        "output folder holds other files": (["train", *base, "-o", str(tmp_path / "taken")], "other files"),
        "overwrite of a folder that is no tree-lora output": (
            ["train", *base, "--overwrite", "-o", str(tmp_path / "taken")],
            "other files",
        ),
        "binary data in a .txt file": (
            ["train", "--model", model, "--data", str(tmp_path / "random.txt"), "-o", out],
            "is not UTF-8 text",
        ),
        "an adapter folder as --model": (
            ["train", "--model", str(tmp_path / "adapter"), "--data", text, "-o", out],
            "is an adapter folder",
        ),
        "export of an adapter with damaged weights": (
            ["export", str(tmp_path / "damaged"), out],
            "is not a readable safetensors file",
        ),
        "compare at depth 0": (["compare", *base, "--depth", "0", "-o", out], "--depth >= 1"),
        "unknown command": (["fly"], "invalid choice"),
        "inspect a folder without an adapter": (["inspect", str(tmp_path)], "adapter_config.json"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing model folder",
        "unknown hub model",
        "data without text",
        "missing data file",
        "unknown hub dataset",
        "depth out of range",
        "zero steps",
        "learning rate out of range",
        "layers out of range",
        "unknown target module",
        "sequence longer than the model's context",
        "output folder holds other files",
        "overwrite of a folder that is no tree-lora output",
        "binary data in a .txt file",
        "an adapter folder as --model",
        "export of an adapter with damaged weights",
        "compare at depth 0",
        "unknown command",
        "inspect a folder without an adapter",
    ],
)
def test_bad_input_is_one_line_on_stderr_with_status_2_and_nothing_written(case, assets, tmp_path, capsys):
    argv, mentions = _bad_inputs(assets, tmp_path)[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tree-lora: error:"), captured.err
    assert mentions in lines[0]
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_inspect_and_generate_refuse_a_lora_adapter(command, assets, tmp_path, capsys):
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(tmp_path / "lora"), "--model", str(assets["model"]), *extra]) == 2
    err = capsys.readouterr().err
    assert "LORA adapter, not a TreeLoRA one" in err and len(err.strip().splitlines()) == 1


def test_plugin_modules_become_subcommands(tmp_path, monkeypatch, capsys):
    (tmp_path / "tree_lora_fake_plugin.py").write_text(
        textwrap.dedent(
            """
            def configure_parser(parser):
                parser.add_argument("--times", type=int, default=1)

            def run(args):
                print("plugged in" * args.times)
                return 7
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("peft_tree_lora.app.cli.PLUGINS", {"fake": ("tree_lora_fake_plugin", "a test plug-in")})
    assert main(["fake", "--times", "2"]) == 7
    assert capsys.readouterr().out.strip() == "plugged inplugged in"


def test_bench_runs_the_checkouts_benchmark_and_says_where_there_is_none(monkeypatch, capsys):
    from peft_tree_lora.app.cli import bench

    assert bench.find_benchmark() is not None  # this source checkout has benchmarks/tree_lora_bench
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--quick" in capsys.readouterr().out
    monkeypatch.setattr(bench, "find_benchmark", lambda: None)  # as from an installed wheel
    for argv in (["bench", "--quick"], ["bench", "--help"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run it from a checkout" in err[0]


def test_an_import_error_in_a_sub_command_is_shown_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "tree_lora_broken_plugin.py").write_text("import tree_lora_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("peft_tree_lora.app.cli.PLUGINS", {"broken": ("tree_lora_broken_plugin", "a broken plug-in")})
    with pytest.raises(ModuleNotFoundError, match="tree_lora_no_such_module"):
        main(["broken"])


HELP_IMPORTS = """
import importlib, json, sys
import peft_tree_lora

def loaded_by(call):
    before = set(sys.modules)
    try:
        call()
    except SystemExit:
        pass
    return sorted(name for name in set(sys.modules) - before if name.startswith(("peft_tree_lora", "benchmarks")))

loaded = {"cli": loaded_by(lambda: importlib.import_module("peft_tree_lora.app.cli"))}
main = sys.modules["peft_tree_lora.app.cli"].main
loaded["help"] = loaded_by(lambda: main(["--help"]))
loaded["train"] = loaded_by(lambda: main(["train", "--help"]))
print("LOADED " + json.dumps(loaded))
"""


def test_a_sub_command_module_is_imported_only_when_that_command_runs():
    done = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.split("LOADED ", 1)[1])
    assert loaded["cli"] == ["peft_tree_lora.app", "peft_tree_lora.app.cli", "peft_tree_lora.errors"]  # no tuner
    assert loaded["help"] == []
    assert "peft_tree_lora.app.cli.train" in loaded["train"]
    for other in ("compare", "inspect", "generate", "bench"):
        assert f"peft_tree_lora.app.cli.{other}" not in loaded["train"]
    assert not [name for name in loaded["train"] if name.startswith(("peft_tree_lora.experiments", "benchmarks"))]
    assert "peft_tree_lora.app.runner" not in loaded["train"]  # the training code loads when training starts


def test_python_dash_m_reports_bad_input_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "peft_tree_lora", "train", "--depth", "99", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("tree-lora: error: argument --depth")
    assert not (tmp_path / "out").exists()


def test_train_push_to_hub_uploads_the_adapter_with_its_card(assets, tmp_path):
    from hub_server import HubServer

    with HubServer() as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_dummy", HF_HUB_DISABLE_XET="1")
        env.update(OMP_NUM_THREADS="1")
        argv = ["train", "--model", str(assets["model"]), "--data", str(assets["text"]), *FAST, *TREE]
        argv += ["-o", str(tmp_path / "out"), "--push-to-hub", "tester/cli-tree"]
        done = subprocess.run(
            [sys.executable, "-m", "peft_tree_lora", *argv], capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "pushed to tester/cli-tree" in done.stdout
        files = hub.files("tester/cli-tree")
    assert files["adapter_model.safetensors"] == (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert "TREELORA" in files["adapter_config.json"].decode() and "README.md" in files


@pytest.mark.parametrize(
    "command",
    [["compare", "-o", "{out}"], ["facts", "-o", "{out}"], ["experiment", "capacity", "--out", "{out}"]],
    ids=["compare", "facts", "experiment"],
)
def test_a_command_that_plots_refuses_before_training_when_matplotlib_is_missing(
    command, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib.util.find_spec("matplotlib") is None
    output = tmp_path / "out"
    assert main([part.format(out=output) for part in command]) == 2
    error = capsys.readouterr().err
    assert "matplotlib, which is not installed: pip install matplotlib" in error and "[embedded]" in error
    assert not output.exists()  # nothing trained, nothing written
