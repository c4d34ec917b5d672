"""The facts studies' word-level view of the synthetic people: a closed vocabulary in which each word is one token,
biography blocks for training, held-out blocks for the runner's loss, and recall queries."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..app.people import (
    ATTRIBUTES,
    CITIES,
    DAYS,
    EMPLOYERS,
    EOS,
    FIRST_NAMES,
    LAST_NAMES,
    MONTHS,
    TEMPLATES,
    UNIVERSITIES,
    YEARS,
    Person,
    held_out_template,
    prompt_and_answer,
    statement,
    training_statements,
)
from ..tuner.errors import TreeLoraUsageError


class WordTokenizer:
    """A closed word vocabulary: every word the generator can write is one token, `<eos>` is 0. Facts then cost a
    token or three each (a date is day, month, year), so a tiny model spends its capacity on facts, not spelling."""

    def __init__(self) -> None:
        words = set(FIRST_NAMES + LAST_NAMES + CITIES + EMPLOYERS + UNIVERSITIES + MONTHS + DAYS + YEARS)
        for templates in TEMPLATES.values():
            for template in templates:
                words.update(w for w in template.split() if not w.startswith("{"))
        self.vocab = [EOS, *sorted(words)]
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.eos_token_id = 0

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[word] for word in text.split()]
        except KeyError as error:
            raise TreeLoraUsageError(f"the word {error.args[0]!r} is not in the facts vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


def document_blocks(
    tokenizer: WordTokenizer, people: list[Person], epochs: int, seed: int, include_held_out: bool
) -> torch.Tensor:
    """One block per person and epoch: `<eos>` then that person's statements in an order shuffled per epoch,
    padded with `<eos>` to a common length (a short biography, as in Allen-Zhu and Li's bioS data)."""
    rng = random.Random(f"blocks/{seed}")
    documents = []
    for _ in range(epochs):
        for index, person in enumerate(people):
            sentences = training_statements(person, index, include_held_out)
            rng.shuffle(sentences)
            documents.append([tokenizer.eos_token_id] + tokenizer.encode(" ".join(sentences)))
    return _pad(documents, tokenizer.eos_token_id)


def held_out_blocks(tokenizer: WordTokenizer, people: list[Person]) -> torch.Tensor:
    """Per person, the four held-out paraphrases in one block: the held-out loss the runner tracks."""
    documents = []
    for index, person in enumerate(people):
        sentences = [statement(person, a, held_out_template(index, i)) for i, a in enumerate(ATTRIBUTES)]
        documents.append([tokenizer.eos_token_id] + tokenizer.encode(" ".join(sentences)))
    return _pad(documents, tokenizer.eos_token_id)


def _pad(documents: list[list[int]], pad: int) -> torch.Tensor:
    length = max(len(d) for d in documents)
    return torch.tensor([d + [pad] * (length - len(d)) for d in documents], dtype=torch.long)


def recall_queries(
    tokenizer: WordTokenizer, people: list[Person], held_out: bool = True
) -> list[tuple[str, list[int], list[int]]]:
    """(attribute, prompt ids, answer ids) per fact: with `held_out`, the paraphrase training never showed for that
    person; otherwise the first paraphrase it did show (a memorisation check)."""
    queries = []
    for index, person in enumerate(people):
        for a, attribute in enumerate(ATTRIBUTES):
            hidden = held_out_template(index, a)
            template = hidden if held_out else next(t for t in range(len(TEMPLATES[attribute])) if t != hidden)
            prompt, answer = prompt_and_answer(person, attribute, template)
            queries.append((attribute, [tokenizer.eos_token_id] + tokenizer.encode(prompt), tokenizer.encode(answer)))
    return queries
