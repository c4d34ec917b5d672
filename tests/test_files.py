"""The shared helpers for adapter folders: Hub id or local path, and folders written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peft_tree_lora.integrations.files import is_hub_id, staged_directory, staged_files, tree_adapter_config
from peft_tree_lora.tuner.errors import TreeLoraUsageError


@pytest.mark.parametrize(
    "name, hub, hub_with_owner",
    [
        ("owner/name", True, True),
        ("gpt2", True, False),
        ("./model", False, False),
        ("/abs/model", False, False),
        ("~/model", False, False),
        ("a/b/c", False, False),
        ("owner/bad--name", False, False),
        ("owner/name/", False, False),
        ("", False, False),
        (None, False, False),
    ],
)
def test_a_hub_id_is_a_valid_repo_id_that_does_not_look_like_a_path(name, hub, hub_with_owner):
    assert is_hub_id(name) is hub
    assert is_hub_id(name, owner_required=True) is hub_with_owner


def test_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not is_hub_id("owner/name")


def test_a_tree_adapter_folder_is_one_whose_config_says_treelora(tmp_path):
    with pytest.raises(TreeLoraUsageError, match="has no adapter_config.json"):
        tree_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(TreeLoraUsageError, match="is not valid JSON"):
        tree_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(TreeLoraUsageError, match="holds a LORA adapter, not a TreeLoRA one.*Use PEFT"):
        tree_adapter_config(tmp_path, remedy="Use PEFT.")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "TREELORA", "depth": 2}))
    assert tree_adapter_config(tmp_path)["depth"] == 2


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("failed half way")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target) as staging:
        (staging / "whole.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "whole.txt").read_text() == "whole"
    with pytest.raises(OSError):  # a non-empty folder is only replaced when asked to
        with staged_directory(target) as staging:
            (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["whole.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_directory(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_staged_files_replace_file_by_file_and_keep_the_rest(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "model.bin").write_text("old")
    with staged_files(tmp_path) as staging:
        (staging / "model.bin").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "more.txt").write_text("more")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model.bin", "sub"]
    assert (tmp_path / "model.bin").read_text() == "new" and (tmp_path / "sub" / "more.txt").read_text() == "more"
    with pytest.raises(RuntimeError):
        with staged_files(tmp_path) as staging:
            (staging / "model.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model.bin", "sub"]


def test_a_copy_another_process_moved_in_first_is_kept_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "model"
    real_replace = os.replace

    def another_process_wins(source, destination):
        Path(destination).mkdir(exist_ok=True)
        (Path(destination) / "STAMP").write_text("theirs")
        real_replace(source, destination)  # fails: the destination is a non-empty folder now

    monkeypatch.setattr(os, "replace", another_process_wins)
    with staged_directory(target, replace=True, complete=lambda folder: (folder / "STAMP").is_file()) as staging:
        (staging / "STAMP").write_text("ours")
    assert (target / "STAMP").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(OSError):
        with staged_directory(target, replace=True) as staging:
            (staging / "STAMP").write_text("ours")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
