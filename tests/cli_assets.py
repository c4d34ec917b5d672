"""A tiny causal LM saved with a character-level tokenizer, for end-to-end tests of the command line and the
notebook (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

from conftest import VOCAB, make_tiny_llama
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(" \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'\"-()")

SAMPLE_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and the king of Denmark speaks. "
    f"def add(x, y): return x + y  # line {i}"
    for i in range(60)
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama (vocab 96) with its character tokenizer, saved as a model folder."""
    make_tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_sample_text(path: Path) -> Path:
    path.write_text(SAMPLE_TEXT)
    return path
