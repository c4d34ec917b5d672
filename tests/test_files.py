"""The shared helpers for adapter folders: Hub id or local path, and folders written whole or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from peft_tree_lora.app.cli.claim import COMMAND_FILE, LOCK_FILE, claimed_output_dir
from peft_tree_lora.integrations.files import (
    is_hub_id,
    recover_interrupted_save,
    staged_directory,
    staged_files,
    tree_adapter_config,
)
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


def test_staged_files_swap_in_the_new_files_and_keep_the_users_other_files(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (target / "model.bin").write_text("old")
    with staged_files(target) as staging:
        (staging / "model.bin").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "more.txt").write_text("more")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "model.bin", "sub"]
    assert (target / "model.bin").read_text() == "new" and (target / "sub" / "more.txt").read_text() == "more"
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(RuntimeError):
        with staged_files(target) as staging:
            (staging / "model.bin").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "model.bin").read_text() == "new"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "model.bin", "sub"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a staging folder was left behind"


SAVE_KILLED_AT_A_RENAME = """
import os, sys
from pathlib import Path
from peft_tree_lora.integrations.files import staged_files

target, renames_before_kill = Path(sys.argv[1]), int(sys.argv[2])
real_replace, done = os.replace, []

def replace_then_die(source, destination):
    if len(done) == renames_before_kill:
        os._exit(9)  # killed: no clean-up runs
    done.append(source)
    real_replace(source, destination)

os.replace = replace_then_die
with staged_files(target) as staging:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staging / name).write_text("new")
"""


@pytest.mark.parametrize(("renames_before_kill", "survivor"), [(0, "old"), (1, "old"), (2, "new")])
def test_a_save_killed_between_renames_leaves_the_old_or_the_new_folder_whole(tmp_path, renames_before_kill, survivor):
    target = tmp_path / "adapter"
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "notes.txt"):
        (target / name).write_text("old")
    killed = subprocess.run(
        [sys.executable, "-c", SAVE_KILLED_AT_A_RENAME, str(target), str(renames_before_kill)], timeout=120
    )
    assert killed.returncode == 9
    recover_interrupted_save(target)
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert contents == {"adapter_config.json": survivor, "adapter_model.safetensors": survivor, "notes.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "staging folders of the killed save were kept"


def test_the_next_save_repairs_a_killed_save_and_clears_its_staging_folders(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text("old")
    subprocess.run([sys.executable, "-c", SAVE_KILLED_AT_A_RENAME, str(target), "2"], timeout=120)
    assert not target.exists() and len(list(tmp_path.iterdir())) == 2  # the ready and the old folder
    with staged_files(target) as staging:
        (staging / "adapter_config.json").write_text("newest")
    assert (target / "adapter_config.json").read_text() == "newest"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


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


# --- claiming a run's output folder -------------------------------------------------------------------------------


def test_two_runs_claiming_one_new_folder_at_once_cannot_both_have_it(tmp_path):
    target = tmp_path / "out"
    start, loser_done = threading.Barrier(2), threading.Event()
    outcomes = []

    def run():
        start.wait()
        try:
            with claimed_output_dir(target, overwrite=False):
                (target / COMMAND_FILE).write_text("{}")
                loser_done.wait(timeout=30)  # hold the folder until the other run has tried
                outcomes.append("claimed")
        except TreeLoraUsageError as error:
            outcomes.append(str(error))
            loser_done.set()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes, key=len)[0] == "claimed"
    assert "another tree-lora run is writing to --output-dir" in sorted(outcomes, key=len)[1]
    with pytest.raises(TreeLoraUsageError, match="holds an earlier tree-lora output; add --overwrite"):
        with claimed_output_dir(target, overwrite=False):
            pass  # and once the first run is done, its output is not replaced without --overwrite


def test_a_run_that_fails_before_saving_leaves_no_output_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(TreeLoraUsageError, match="bad data"):
        with claimed_output_dir(target, overwrite=False):
            (target / COMMAND_FILE).write_text("{}")
            raise TreeLoraUsageError("bad data")
    assert list(tmp_path.iterdir()) == []


def earlier_output(target: Path) -> None:
    target.mkdir()
    (target / COMMAND_FILE).write_text("earlier")
    (target / "stale-checkpoint.bin").write_text("earlier")


def test_overwrite_leaves_only_the_new_runs_files(tmp_path):
    target = tmp_path / "out"
    earlier_output(target)
    with claimed_output_dir(target, overwrite=True):
        assert list(target.iterdir()) == [target / LOCK_FILE]
        (target / COMMAND_FILE).write_text("new")
        (target / "adapter_config.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", COMMAND_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the earlier output was left in a hidden folder"


def test_overwrite_puts_the_earlier_output_back_when_the_new_run_fails_before_saving(tmp_path):
    target = tmp_path / "out"
    earlier_output(target)
    with pytest.raises(KeyboardInterrupt):
        with claimed_output_dir(target, overwrite=True):
            (target / COMMAND_FILE).write_text("new")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        COMMAND_FILE: "earlier",
        "stale-checkpoint.bin": "earlier",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_touches_a_folder_that_is_not_a_tree_lora_output(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(TreeLoraUsageError, match="holds other files; give a new or empty folder"):
        with claimed_output_dir(tmp_path, overwrite=True):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
