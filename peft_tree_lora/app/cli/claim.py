"""Claiming an output folder for one run: two runs started into the same folder cannot both pass the "folder must be
new" check, `--overwrite` yields a folder with only the new run's files, and a run that fails before it saved
anything leaves the folder as it found it.

The claim is an exclusive `flock` on a lock file inside the folder (created with `os.mkdir` when the folder is new),
held for the whole run and released by the OS if the process dies; where `fcntl` is missing, the lock file is
created with `O_EXCL` instead. The checks of the folder's contents run while the lock is held.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...tuner.errors import TreeLoraUsageError

LOCK_FILE = ".tree-lora.lock"  # held by the run writing the folder; removed when it ends
COMMAND_FILE = "tree_lora_command.json"  # the command that made an output folder (marks the folder as ours)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@contextmanager
def claimed_output_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Hold `path` for one run. Refused (a `TreeLoraUsageError`, nothing changed): a file, a folder another run
    holds, a folder with anything but an earlier tree-lora output, and an earlier output without `overwrite`.

    With `overwrite`, the earlier output is moved to a hidden sibling folder, deleted when the block ends and put
    back if the block fails before the new run saved anything. A failing block that saved nothing leaves no trace:
    a folder created for it is removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TreeLoraUsageError(f"--output-dir {str(path)!r} is a file; give a new or empty folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        created = False
    lock = _lock(path)
    earlier: Path | None = None
    try:
        _check_contents(path, overwrite)
        if _contents(path):
            earlier = _move_aside(path)
    except BaseException:
        _release(path, lock, remove_folder=created)
        raise
    try:
        yield path
    except BaseException:
        saved = [item.name for item in _contents(path) if item.name != COMMAND_FILE]
        if not saved:  # nothing of the new run to keep: the folder goes back to what it was
            for item in _contents(path):
                _remove(item)
            if earlier is not None:
                _move_back(earlier, path)
                earlier = None
        raise
    finally:
        if earlier is not None:
            shutil.rmtree(earlier, ignore_errors=True)
        _release(path, lock, remove_folder=created and not _contents(path))


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but an earlier tree-lora output, and an earlier output without
    --overwrite: nothing the user had is ever replaced. (Without the claim, only a check: see
    `claimed_output_dir`.)"""
    if path.exists() and not path.is_dir():
        raise TreeLoraUsageError(f"--output-dir {str(path)!r} is a file; give a new or empty folder.")
    if path.is_dir():
        _check_contents(path, overwrite)


def _check_contents(path: Path, overwrite: bool) -> None:
    if not _contents(path):
        return
    if not (path / COMMAND_FILE).is_file():
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} exists and holds other files; give a new or empty folder "
            "(tree-lora only replaces its own earlier output, with --overwrite)."
        )
    if not overwrite:
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} holds an earlier tree-lora output; add --overwrite to replace it, "
            "or give a new folder."
        )


def _contents(path: Path) -> list[Path]:
    return [item for item in path.iterdir() if item.name != LOCK_FILE] if path.is_dir() else []


def _lock(path: Path) -> int:
    busy = TreeLoraUsageError(
        f"another tree-lora run is writing to --output-dir {str(path)!r} right now; wait for it to end or give "
        "another folder."
    )
    lock_file = path / LOCK_FILE
    if fcntl is None:
        try:
            return os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise TreeLoraUsageError(f"{busy} (If no run is, delete {lock_file}.)") from None
    descriptor = os.open(lock_file, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise busy from None
    return descriptor


def _release(path: Path, descriptor: int, remove_folder: bool) -> None:
    try:
        (path / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(descriptor)
    if remove_folder:
        try:
            path.rmdir()
        except OSError:  # something else appeared in it meanwhile: keep it
            pass


def _move_aside(path: Path) -> Path:
    """Move the earlier output's files into a hidden sibling folder (the lock file stays), so that the new run
    starts from an empty folder and the earlier output is still there should the new run fail."""
    aside = path.parent / f".{path.name}.replaced-{os.getpid()}-{os.urandom(3).hex()}"
    aside.mkdir()
    for item in _contents(path):
        os.replace(item, aside / item.name)
    return aside


def _move_back(aside: Path, path: Path) -> None:
    for item in aside.iterdir():
        os.replace(item, path / item.name)
    aside.rmdir()


def _remove(item: Path) -> None:
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item)
    else:
        item.unlink()
