"""Installing the package is enough: the start-up hook registers TreeLoRA right after `import peft`, in programs that
never import the plugin (lm-evaluation-harness, scripts), costs start-up nothing heavy, and can be switched off.

Each behaviour runs in a fresh interpreter that never imports `peft_tree_lora`. Site processing is simulated with
`site.addsitedir` on a folder holding the project's `.pth` file (the hook module comes from this checkout through
PYTHONPATH); one test checks the `.pth` of the environment the tests run in, when the package is installed with it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import logits, trained_looking, tree_model

import _peft_tree_lora_autoload as autoload

ROOT = Path(__file__).resolve().parents[1]
PTH = ROOT / "peft_tree_lora_autoload.pth"
HEAVY = ("torch", "peft", "transformers", "peft_tree_lora")


def python(code: str, sitedir: Path | None, **environment: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose site processing includes `sitedir` (with the project's .pth)."""
    prelude = f"import site; site.addsitedir({str(sitedir)!r})\n" if sitedir is not None else ""
    env = {name: value for name, value in os.environ.items() if name != autoload.DISABLE_VARIABLE}
    env.update(PYTHONPATH=str(ROOT), **environment)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sitedir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site-packages")
    shutil.copy(PTH, folder / PTH.name)
    return folder


@pytest.fixture(scope="module")
def saved_tree(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and a trained-looking TreeLoRA adapter saved to disk, with the logits the adapter gives."""
    root = tmp_path_factory.mktemp("autoload")
    make_tiny_llama().save_pretrained(root / "base")
    model = trained_looking(tree_model(make_tiny_llama(), depth=2, r=2)).eval()
    model.save_pretrained(root / "adapter")
    input_ids = torch.arange(3, 15).unsqueeze(0)
    torch.save({"input_ids": input_ids, "logits": logits(model, input_ids)}, root / "expected.pt")
    return {"base": root / "base", "adapter": root / "adapter", "expected": root / "expected.pt"}


LOAD_WITH_PLAIN_PEFT = """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    expected = torch.load({expected!r})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r}).eval()
    with torch.no_grad():
        same = torch.allclose(model(input_ids=expected["input_ids"]).logits, expected["logits"], atol=1e-6)
    print(model.peft_config["default"].peft_type.value, same)
"""


def test_the_pth_line_installs_the_hook_and_imports_neither_peft_nor_torch(sitedir):
    result = python(
        f"""
        import json, sys
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules],
                          "first_finder": type(sys.meta_path[0]).__name__}}))
        """,
        sitedir,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"loaded": [], "first_finder": "PeftImportFinder"}


def test_find_spec_probe_for_peft_returns_its_spec_and_imports_nothing(sitedir):
    result = python(
        f"""
        import importlib.util, json, sys
        spec = importlib.util.find_spec("peft")
        import transformers.utils
        available = transformers.utils.is_peft_available()  # transformers' own probe
        print(json.dumps({{"origin": spec.origin, "available": available,
                          "loaded": [m for m in {HEAVY!r} if m in sys.modules and m != "transformers"]}}))
        """,
        sitedir,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["origin"].endswith(os.path.join("peft", "__init__.py")) and report["available"] is True
    assert report["loaded"] == []


def test_plain_peft_loads_a_saved_tree_adapter_in_a_program_that_never_imports_the_plugin(sitedir, saved_tree):
    result = python(LOAD_WITH_PLAIN_PEFT.format(**{k: str(v) for k, v in saved_tree.items()}), sitedir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["TREELORA", "True"]  # same outputs as the model that was saved


def test_with_the_switch_off_plain_peft_does_not_know_treelora(sitedir, saved_tree):
    code = LOAD_WITH_PLAIN_PEFT.format(**{k: str(v) for k, v in saved_tree.items()})
    result = python(code, sitedir, **{autoload.DISABLE_VARIABLE: "1"})
    assert result.returncode != 0
    assert "KeyError: 'TREELORA'" in result.stderr


def test_a_plugin_that_fails_to_import_is_a_warning_not_a_failure_of_import_peft(sitedir):
    result = python(
        """
        import warnings, _peft_tree_lora_autoload
        _peft_tree_lora_autoload.PLUGIN = "no_such_plugin_module"  # stands for a broken installation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        print([str(w.message) for w in caught if "could not register TreeLoRA" in str(w.message)])
        """,
        sitedir,
    )
    assert result.returncode == 0, result.stderr
    assert "No module named 'no_such_plugin_module'" in result.stdout


def test_import_peft_tree_lora_and_the_command_line_help_import_neither_peft_nor_torch():
    result = python(
        f"""
        import contextlib, io, json, sys
        import peft_tree_lora
        from peft_tree_lora.app.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
            main(["--help"])
        print(json.dumps({{"loaded": [m for m in {HEAVY[:3]!r} if m in sys.modules],
                          "help": "train" in help_text.getvalue()}}))
        """,
        None,
        **{autoload.DISABLE_VARIABLE: "1"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"loaded": [], "help": True}


def test_import_peft_tree_lora_registers_once_peft_is_imported_even_with_the_switch_off():
    result = python(
        """
        import peft_tree_lora
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["TREELORA"].__name__)
        """,
        None,
        **{autoload.DISABLE_VARIABLE: "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TreeLoraConfig"


def test_every_public_name_of_the_package_resolves_on_first_use():
    import peft_tree_lora

    assert set(peft_tree_lora.__all__) - {"__version__"} == set(peft_tree_lora._LAZY)
    assert all(getattr(peft_tree_lora, name) is not None for name in peft_tree_lora.__all__)
    assert peft_tree_lora.TreeLoraConfig.__module__ == "peft_tree_lora.tuner.config"


@pytest.mark.parametrize(
    "value, disabled", [("", False), ("0", False), ("1", True), ("yes", True), ("false", False), ("true", True)]
)
def test_the_switch_is_any_value_but_empty_zero_or_false(value, disabled):
    assert autoload.autoload_disabled({autoload.DISABLE_VARIABLE: value}) is disabled


def test_the_installed_environment_has_the_pth_when_the_package_was_installed_with_it():
    purelib = Path(sysconfig.get_paths()["purelib"])  # this environment's site-packages, not a checkout's egg-info
    installed = next(importlib.metadata.distributions(name="peft-tree-lora", path=[str(purelib)]), None)
    if installed is None:
        pytest.skip(f"peft-tree-lora is not installed in {purelib} (tests run from a checkout)")
    if not any(file.name == PTH.name for file in installed.files or []):
        pytest.skip(
            f"the peft-tree-lora installed in {purelib} predates {PTH.name} (installed from another checkout or an "
            "older version): reinstall with `pip install -e .` or `python3 tasks.py setup` to get the hook"
        )
    assert (purelib / PTH.name).read_text() == PTH.read_text()
    result = python("import sys; print(type(sys.meta_path[0]).__name__)", None)
    assert result.stdout.strip() == "PeftImportFinder"
