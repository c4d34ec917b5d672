"""The synthetic-facts data of the main job, tokenized with a real (sub-word) tokenizer.

The people, their facts, the four paraphrase templates per fact and which paraphrase is held out for whom all come
from `app.people`; this module only turns them into token ids for a Hugging Face tokenizer:

- a training document is a short biography: one statement per fact (four statements, a few dozen tokens), each
  in one of the three paraphrases training may show for that person; the paraphrase rotates with the epoch, so
  every epoch shows every fact and three epochs show all three trained paraphrases. The held-out paraphrase of
  a fact is never in any training document of that person (it is in other people's documents).
- a held-out document states a person's four facts in the held-out paraphrases (the runner's held-out loss);
- a recall query is (attribute, prompt ids, answer ids): the prompt is the statement's words before the value,
  the answer is the value and the closing full stop, tokenized *inside the full statement* so that the ids are
  exactly those the model sees in a document, and split where the prompt's characters end.

Every document and query opens with one start token and writes each statement with a leading space, so a
statement tokenizes the same at the start of a document, in the middle of one, and in a query.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..tuner.errors import TreeLoraUsageError
from .people import ATTRIBUTES, TEMPLATES, Person, held_out_template, prompt_and_answer, statement

Query = tuple[str, list[int], list[int]]


def trained_templates(person_index: int, attribute_index: int) -> list[int]:
    """The paraphrases of this fact that training may show for this person (all but the held-out one)."""
    hidden = held_out_template(person_index, attribute_index)
    return [t for t in range(len(TEMPLATES[ATTRIBUTES[attribute_index]])) if t != hidden]


def biography(person: Person, person_index: int, epoch: int, rng: random.Random) -> str:
    """One statement per fact, each in a trained paraphrase chosen by the epoch, in an order drawn from `rng`."""
    sentences = []
    for a, attribute in enumerate(ATTRIBUTES):
        shown = trained_templates(person_index, a)
        sentences.append(statement(person, attribute, shown[(epoch + a) % len(shown)]))
    rng.shuffle(sentences)
    return " ".join(sentences)


def held_out_text(person: Person, person_index: int) -> str:
    return " ".join(statement(person, a, held_out_template(person_index, i)) for i, a in enumerate(ATTRIBUTES))


def start_token(tokenizer: Any) -> int:
    """The token every document and query opens with (the end-of-sequence token, as between documents)."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if token is None:
        raise TreeLoraUsageError("the tokenizer has neither an end-of-sequence nor a padding token.")
    return int(token)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(" " + text, add_special_tokens=False)["input_ids"])


def pad_documents(documents: list[list[int]], pad: int) -> torch.Tensor:
    length = max(len(d) for d in documents)
    return torch.tensor([d + [pad] * (length - len(d)) for d in documents], dtype=torch.long)


def training_blocks(tokenizer: Any, people: list[Person], epochs: int, seed: int) -> torch.Tensor:
    """`epochs` biographies per person (one per epoch, people shuffled within each epoch), each
    `[start] + tokens`, padded with the start token to the longest."""
    rng = random.Random(f"facts-job/{seed}")
    start = start_token(tokenizer)
    documents = []
    for epoch in range(epochs):
        order = list(range(len(people)))
        rng.shuffle(order)
        for index in order:
            documents.append([start] + encode(tokenizer, biography(people[index], index, epoch, rng)))
    return pad_documents(documents, start)


def held_out_blocks(tokenizer: Any, people: list[Person]) -> torch.Tensor:
    start = start_token(tokenizer)
    return pad_documents([[start] + encode(tokenizer, held_out_text(p, i)) for i, p in enumerate(people)], start)


def query(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of `prompt answer`: the whole statement is tokenized once (as in a document) and
    split at the first token that starts at or after the end of the prompt's characters. Raises if a token
    straddles that boundary (the answer would not be a whole number of tokens)."""
    text = " " + prompt
    full = " ".join((text, answer))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    split = next((i for i, (begin, _) in enumerate(offsets) if begin >= len(text)), len(ids))
    if split == 0 or split == len(ids) or offsets[split - 1][1] > len(text):
        raise TreeLoraUsageError(f"cannot split {full!r} into prompt and answer tokens with this tokenizer.")
    return ids[:split], ids[split:]


def recall_queries(tokenizer: Any, people: list[Person], held_out: bool = True) -> list[Query]:
    """(attribute, prompt ids, answer ids) per fact. With `held_out`, the paraphrase training never showed for
    that person; otherwise the first paraphrase it did show. Prompts open with the start token."""
    start = start_token(tokenizer)
    queries = []
    for index, person in enumerate(people):
        for a, attribute in enumerate(ATTRIBUTES):
            template = held_out_template(index, a) if held_out else trained_templates(index, a)[0]
            prompt_ids, answer_ids = query(tokenizer, *prompt_and_answer(person, attribute, template))
            queries.append((attribute, [start] + prompt_ids, answer_ids))
    return queries
