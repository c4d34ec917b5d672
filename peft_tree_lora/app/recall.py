"""Exact-match recall of facts by a causal LM in one forward pass per batch, served or with soft routing, and the
Fano lower bound on the bits that recall carries."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..tuner.errors import TreeLoraUsageError
from ..tuner.model import TreeLoraModel
from .people import ATTRIBUTES, VALUE_COUNTS


def answers_correct(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Per row: does greedy decoding reproduce the answer exactly? With the true prefix fed in, greedy decoding
    writes the answer if and only if the arg-max at every answer position is the answer token, so one forward pass
    decides it. `answer_mask` marks the answer tokens in `input_ids`."""
    predicted = logits[:, :-1].argmax(dim=-1)
    target, mask = input_ids[:, 1:], answer_mask[:, 1:]
    return ((predicted == target) | ~mask).all(dim=1)


@contextmanager
def soft_inference(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate a TreeLoRA model with soft inference routing (every leaf mixed by its path probability, as in
    training) inside the block; afterwards every adapter is back at its configured inference routing."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, TreeLoraModel):
        raise TreeLoraUsageError("soft inference routing needs a TreeLoRA model.")
    tuner.set_inference_routing("soft")
    try:
        yield
    finally:
        for adapter, config in model.peft_config.items():
            tuner.set_inference_routing(config.inference_routing, adapter)


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, queries: list[tuple[str, list[int], list[int]]], pad: int, soft: bool = False
) -> list[bool]:
    """Exact-match recall of every query under the model's inference routing (hard: one leaf), or with `soft`, of a
    TreeLoRA model under soft routing (all leaves mixed), restored afterwards. A sequence-routed tree picks its
    leaf (or, soft, its mixture) from the prompt alone, as `generate()` does, so the answer cannot steer the
    route."""
    if soft:
        with soft_inference(model):
            return _exact_match(model, queries, pad, soft=True)
    return _exact_match(model, queries, pad, soft=False)


def _exact_match(
    model: torch.nn.Module, queries: list[tuple[str, list[int], list[int]]], pad: int, soft: bool
) -> list[bool]:
    model.eval()
    tuner = getattr(model, "base_model", None)
    sequence_routed = isinstance(tuner, TreeLoraModel) and any(
        getattr(c, "routing", None) == "sequence" for c in model.peft_config.values()
    )
    width = max(len(p) + len(a) for _, p, a in queries)
    input_ids = torch.full((len(queries), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids, dtype=torch.bool)
    answer_mask = torch.zeros_like(attention)
    prompt_ids = torch.full((len(queries), max(len(p) for _, p, _ in queries)), pad, dtype=torch.long)
    prompt_attention = torch.zeros_like(prompt_ids, dtype=torch.bool)
    for row, (_, prompt, answer) in enumerate(queries):
        input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        attention[row, : len(prompt) + len(answer)] = True
        answer_mask[row, len(prompt) : len(prompt) + len(answer)] = True
        prompt_ids[row, : len(prompt)] = torch.tensor(prompt)
        prompt_attention[row, : len(prompt)] = True
    correct = torch.zeros(len(queries), dtype=torch.bool)
    batch = 512
    if sequence_routed and soft:
        # A pinned leaf would override the soft mixture. Instead each batch of equally long prompts is routed from
        # the prompts alone and scored with its answers inside one routing call, which holds the prompts' route.
        lengths = [len(p) for _, p, _ in queries]
        for length in sorted(set(lengths)):
            same = [row for row, n in enumerate(lengths) if n == length]
            for start in range(0, len(same), batch):
                rows = torch.tensor(same[start : start + batch])
                with tuner.holding_routes():
                    model(input_ids=input_ids[rows, :length], attention_mask=attention[rows, :length].long())
                    logits = model(input_ids=input_ids[rows], attention_mask=attention[rows].long()).logits
                correct[rows] = answers_correct(logits, input_ids[rows], answer_mask[rows])
        return correct.tolist()
    for start in range(0, len(queries), batch):
        rows = slice(start, start + batch)
        if sequence_routed:
            leaves = tuner.leaf_routes(prompt_ids[rows], prompt_attention[rows].long())["sequence"]
            part = torch.zeros(leaves.shape[0], dtype=torch.bool)
            for leaf in leaves.unique().tolist():
                chosen = (leaves == leaf).nonzero().flatten() + start
                with tuner.pinned_leaf(int(leaf)):
                    logits = model(input_ids=input_ids[chosen], attention_mask=attention[chosen].long()).logits
                part[chosen - start] = answers_correct(logits, input_ids[chosen], answer_mask[chosen])
            correct[rows] = part
        else:
            logits = model(input_ids=input_ids[rows], attention_mask=attention[rows].long()).logits
            correct[rows] = answers_correct(logits, input_ids[rows], answer_mask[rows])
    return correct.tolist()


def fano_bits(accuracy: float, value_count: int) -> float:
    """A lower bound on the information (bits) one recalled fact carries about a value drawn uniformly from
    `value_count` choices, given exact-match accuracy: log2 V - h(e) - e log2(V - 1), with e = 1 - accuracy (Fano's
    inequality). Chance accuracy or worse gives 0; perfect recall gives log2 V."""
    if value_count < 2 or accuracy <= 1.0 / value_count:
        return 0.0  # the bound is slightly positive below chance (always wrong is informative); count it as 0
    error = min(max(1.0 - accuracy, 0.0), 1.0)
    entropy = 0.0 if error in (0.0, 1.0) else -(error * math.log2(error) + (1 - error) * math.log2(1 - error))
    return max(0.0, math.log2(value_count) - entropy - error * math.log2(value_count - 1))


def knowledge_bits(correct: list[bool], attributes: list[str], people: int) -> tuple[float, dict[str, float]]:
    """Total bits (Fano lower bound, summed over attributes) and accuracy per attribute."""
    accuracy = {}
    total = 0.0
    for attribute in ATTRIBUTES:
        hits = [c for c, a in zip(correct, attributes) if a == attribute]
        accuracy[attribute] = sum(hits) / len(hits) if hits else 0.0
        total += people * fano_bits(accuracy[attribute], VALUE_COUNTS[attribute])
    return total, accuracy
