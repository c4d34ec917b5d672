"""Where adapters live, in one place for the integrations and the command line: whether a folder holds a TreeLoRA
adapter, whether a name is a Hub repo id rather than a local path, and writing folders so that an interruption or a
failure never leaves a half-written one behind."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME

from ..tuner.errors import TreeLoraUsageError
from ..tuner.registration import METHOD_NAME

PEFT_TYPE = METHOD_NAME.upper()  # the `peft_type` of a TreeLoRA adapter_config.json
PEFT_PREFIX = "base_model.model."  # how PeftModel prefixes the keys of a saved adapter's weights


# --- TreeLoRA adapter folders ---------------------------------------------------------------------------------


def tree_adapter_config(directory: str | os.PathLike, where: str | None = None, remedy: str = "") -> dict[str, Any]:
    """The `adapter_config.json` of the TreeLoRA adapter saved in `directory`, or a `TreeLoraUsageError` saying
    what is there instead. `where` names the folder in messages; `remedy` is added when it holds another adapter."""
    where = where or repr(str(directory))
    try:
        recover_interrupted_save(directory)
    except OSError:  # a folder we may not write to: read what is there
        pass
    config_file = Path(directory) / CONFIG_NAME
    if not config_file.is_file():
        raise TreeLoraUsageError(
            f"{where} has no {CONFIG_NAME}, so it holds no PEFT adapter; give a folder written by save_pretrained "
            "or `tree-lora train`."
        )
    return read_tree_config(config_file, where, remedy)


def read_tree_config(config_file: str | os.PathLike, where: str, remedy: str = "") -> dict[str, Any]:
    """The contents of an `adapter_config.json` (local, or downloaded from the Hub) if it is a TreeLoRA one."""
    try:
        config = json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as error:
        raise TreeLoraUsageError(f"The {CONFIG_NAME} of {where} is not valid JSON ({error}).") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != PEFT_TYPE:
        raise TreeLoraUsageError(
            f"{where} holds a {peft_type or 'non-PEFT'} adapter, not a TreeLoRA one (its {CONFIG_NAME} says "
            f"peft_type={peft_type!r})." + (f" {remedy}" if remedy else "")
        )
    return config


# --- Hub repo ids ---------------------------------------------------------------------------------------------


def hub_id_problem(name: Any) -> str | None:
    """Why `name` cannot be a Hub repo id, or None when it can."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name:
        return "it is empty" if name == "" else f"it is a {type(name).__name__}, not a string"
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        return str(error).split(":")[0].rstrip(".").lower()
    return None


def require_hub_id(repo_id: Any) -> None:
    """Refuse a name the Hub would refuse as a repo id, naming the rules."""
    reason = hub_id_problem(repo_id)
    if reason:
        raise TreeLoraUsageError(
            f"{repo_id!r} is not a valid Hub repo id ({reason}). Use 'owner/name' or 'name': letters, digits, '-', "
            "'_' and '.', no '--' or '..', not ending in '.git', at most 96 characters."
        )


def is_hub_id(name: Any, *, owner_required: bool = False) -> bool:
    """Whether `name` means a repo on the Hub rather than a local path: a valid repo id that is not an existing
    path and does not start like one ('.', '/', '~'). With `owner_required`, only 'owner/name' counts."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    if owner_required and name.count("/") != 1:
        return False
    return hub_id_problem(name) is None


# --- writing folders whole ------------------------------------------------------------------------------------


@contextmanager
def staged_directory(
    target: str | os.PathLike, *, replace: bool = False, complete: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Build the folder `target` in a sibling staging folder, yielded, and move it into place in one `os.replace`
    when the block ends without an error; on an error nothing is left behind.

    `target` may exist only as an empty folder, unless `replace`: then an existing `target` is removed just before
    the move. Should another process move its own copy in meanwhile, the move fails; that copy is kept when
    `complete(target)` says it is whole, and the error is raised otherwise.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists() and replace:
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()  # refuses a folder that is not empty
        try:
            os.replace(staging, target)
        except OSError:
            if complete is None or not complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_files(target: str | os.PathLike) -> Iterator[Path]:
    """Write the new files of the folder `target` into a staging folder, yielded, then swap the whole folder in by
    renames, so that `target` always holds either the complete earlier save or the complete new one, never a mix.

    Files of `target` that the block does not rewrite (the user's own, the run's command record) are carried over
    (hard-linked where the file system allows, copied otherwise). The swap is three renames: the finished staging
    folder becomes `.<name>.ready-*`, `target` becomes `.<name>.old-*`, the ready folder becomes `target`. A process
    killed between them is repaired by `recover_interrupted_save`, which every save runs first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    staging = target.parent / f".{target.name}.saving-{tag}"
    staging.mkdir()
    ready, old = target.parent / f".{target.name}.ready-{tag}", target.parent / f".{target.name}.old-{tag}"
    try:
        yield staging
        if target.is_dir():
            for item in target.iterdir():
                if not (staging / item.name).exists():
                    _carry(item, staging / item.name)
        os.replace(staging, ready)
        if target.exists():
            os.replace(target, old)
        os.replace(ready, target)
    finally:
        if not target.exists() and old.exists():  # the last rename failed: the earlier save goes back
            os.replace(old, target)
        for leftover in (staging, ready, old):
            shutil.rmtree(leftover, ignore_errors=True)


def recover_interrupted_save(target: str | os.PathLike) -> None:
    """Repair what a save killed half way left next to `target`: when `target` is missing, the complete new folder
    (`.ready-*`) or else the complete earlier one (`.old-*`) becomes `target` again; then the staging folders of
    saves whose process is gone are removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    stale = {kind: _stale(target, kind) for kind in ("saving", "ready", "old")}
    if not target.exists():
        for kind in ("ready", "old"):
            if stale[kind]:
                newest = max(stale[kind], key=lambda folder: folder.stat().st_mtime)
                os.replace(newest, target)
                stale[kind].remove(newest)
                break
    for folders in stale.values():
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def _stale(target: Path, kind: str) -> list[Path]:
    """The `.<name>.<kind>-<pid>-*` folders next to `target` whose process is not running (or is this one: its
    own saves clean up after themselves, so what is left is from a process that had this id before)."""
    found = []
    for folder in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
        pid = folder.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _running(int(pid)):
            found.append(folder)
    return found


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _carry(source: Path, destination: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, destination)


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
        return
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
