"""Text data for training and evaluation: the embedded corpus, a local .txt/.jsonl file, or a Hub dataset, cut into
fixed-length token blocks.

Every block is full (no padding), so a block's loss counts the same number of tokens for every run and a
comparison of held-out losses compares like with like.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..integrations.files import is_hub_id
from ..tuner.errors import TreeLoraUsageError

EMBEDDED = "embedded"
HELD_OUT_PERCENT = 5  # share of documents (by a stable hash of their name) kept out of training
JSONL_TEXT_FIELDS = ("text", "content")


@dataclass
class TextCorpus:
    """Training and held-out documents, and where they came from (for reports)."""

    train: list[str]
    held_out: list[str]
    description: str


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM examples (the labels are the inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise TreeLoraUsageError(f"need at least one token block of shape (n, length); got {tuple(blocks.shape)}.")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def split_by_name(named_texts: list[tuple[str, str]], description: str) -> TextCorpus:
    """A fixed held-out split: a document is held out when a stable hash of its name falls in the last
    `HELD_OUT_PERCENT` of 100 buckets, so the split never depends on order, steps or seed. If that leaves either
    side empty, the last 5% of each document's characters (at a line break) are held out instead."""
    train, held_out = [], []
    for name, text in named_texts:
        bucket = zlib.crc32(name.encode("utf-8")) % 100
        (held_out if bucket >= 100 - HELD_OUT_PERCENT else train).append(text)
    if not train or not held_out:
        train, held_out = [], []
        for _, text in named_texts:
            cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT_PERCENT / 100)))
            cut = cut if cut > 0 else int(len(text) * (1 - HELD_OUT_PERCENT / 100))
            train.append(text[:cut])
            held_out.append(text[cut:])
    return TextCorpus(train=train, held_out=held_out, description=description)


def load_corpus(source: str) -> TextCorpus:
    """`"embedded"` (the default corpus), a local `.txt` or `.jsonl` file, a directory of `.txt` files, or a Hub
    dataset repo id (`owner/name`, read with `datasets`, only when asked for)."""
    if source == EMBEDDED:
        from .embedded import embedded_corpus

        corpus = embedded_corpus()
    else:
        path = Path(source).expanduser()
        if path.exists():
            corpus = _local_corpus(path)
        elif is_hub_id(source, owner_required=True):
            corpus = _hub_corpus(source)
        else:
            raise TreeLoraUsageError(
                f"no data at {source!r}: give 'embedded', an existing .txt/.jsonl file or folder of .txt files, "
                "or a Hub dataset id like 'owner/name'."
            )
    if not any(t.strip() for t in corpus.train) or not any(t.strip() for t in corpus.held_out):
        raise TreeLoraUsageError(f"the data {source!r} holds no text; give a file or dataset with text in it.")
    return corpus


def _local_corpus(path: Path) -> TextCorpus:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise TreeLoraUsageError(f"the folder {str(path)!r} holds no .txt files; give a .txt or .jsonl file.")
        return split_by_name(
            [(str(p.relative_to(path)), _read_text(p)) for p in files], f"{len(files)} files in {path}"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        documents = _read_jsonl(path)
        return split_by_name(
            [(f"{i}", text) for i, text in enumerate(documents)], f"{path.name} ({len(documents)} records)"
        )
    if suffix in (".txt", ".md", ".text", ""):
        text = _read_text(path)
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        if len(paragraphs) >= 20:
            named = [(f"{i}", p + "\n\n") for i, p in enumerate(paragraphs)]
        else:
            named = [(path.name, text)]
        return split_by_name(named, path.name)
    raise TreeLoraUsageError(f"cannot read {path.name!r}: data files must end in .txt or .jsonl.")


def _read_text(path: Path) -> str:
    """The file's text; refused when it is not UTF-8 text (a binary file would train on noise, with exit 0)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TreeLoraUsageError(f"cannot read {str(path)!r}: {error.strerror}.") from None
    except UnicodeDecodeError as error:
        raise TreeLoraUsageError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "training data must be UTF-8 text (.txt) or JSON lines (.jsonl)."
        ) from None
    if "\x00" in text:
        raise TreeLoraUsageError(
            f"{str(path)!r} holds a NUL character (character {text.index(chr(0))}): it is a binary file, not text; "
            "training data must be UTF-8 text (.txt) or JSON lines (.jsonl)."
        )
    return text


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            raise TreeLoraUsageError(
                f"{path.name} line {number} is not JSON; each line must be one JSON object."
            ) from None
        text = _text_of(record)
        if text is None:
            raise TreeLoraUsageError(
                f"{path.name} line {number} has no text; each record needs a string field "
                f"{' or '.join(repr(f) for f in JSONL_TEXT_FIELDS)}."
            )
        documents.append(text)
    return documents


def _text_of(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in JSONL_TEXT_FIELDS:
            if isinstance(record.get(name), str):
                return record[name]
    return None


def _hub_corpus(repo_id: str) -> TextCorpus:
    try:
        import datasets
    except ImportError:
        raise TreeLoraUsageError("reading a Hub dataset needs the 'datasets' package: pip install datasets") from None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:  # one quick question first: the datasets client retries an unreachable Hub for half a minute
        HfApi().dataset_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise TreeLoraUsageError(
            f"unknown dataset {repo_id!r}: no local file of that name and no such dataset on the Hub; give "
            "'embedded', a .txt/.jsonl file, or an existing Hub dataset id."
        ) from None
    except Exception as error:  # network errors come in many types; all mean the Hub cannot be asked
        raise TreeLoraUsageError(
            f"dataset {repo_id!r} is not a local file and the Hub cannot be reached ({type(error).__name__}); "
            "give 'embedded' or a local .txt/.jsonl file."
        ) from None
    try:
        loaded = datasets.load_dataset(repo_id)
    except Exception as error:  # the Hub client raises many types; all mean "cannot get this dataset"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TreeLoraUsageError(f"cannot load the Hub dataset {repo_id!r}: {first_line}") from None
    splits = list(loaded)
    train_split = "train" if "train" in loaded else splits[0]
    held_split = next((s for s in ("validation", "test") if s in loaded), None)

    def texts(split: str) -> list[str]:
        column = next((c for c in JSONL_TEXT_FIELDS if c in loaded[split].column_names), None)
        if column is None:
            raise TreeLoraUsageError(
                f"the Hub dataset {repo_id!r} has no 'text' or 'content' column; its columns are "
                f"{loaded[split].column_names}."
            )
        return [t for t in loaded[split][column] if isinstance(t, str)]

    if held_split is None:
        return split_by_name([(str(i), t) for i, t in enumerate(texts(train_split))], repo_id)
    return TextCorpus(train=texts(train_split), held_out=texts(held_split), description=repo_id)


def tokenize_blocks(
    tokenizer: Any, documents: list[str], block_length: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Token ids of `documents` (each followed by the end-of-sequence token), concatenated and cut into
    `(n, block_length)` blocks; the ragged tail is dropped. Stops tokenising once `max_blocks` are filled."""
    if block_length < 2:
        raise TreeLoraUsageError(f"the sequence length must be at least 2 tokens; got {block_length}.")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = None if max_blocks is None else max_blocks * block_length
    ids: list[int] = []
    batch = 64
    for start in range(0, len(documents), batch):
        encoded = tokenizer(documents[start : start + batch], add_special_tokens=False)["input_ids"]
        for document_ids in encoded:
            ids.extend(document_ids)
            ids.extend(separator)
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // block_length
    if max_blocks is not None:
        count = min(count, max_blocks)
    return torch.tensor(ids[: count * block_length], dtype=torch.long).view(count, block_length)
