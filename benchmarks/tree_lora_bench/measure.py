"""Interleaved timing: every variant once per round, in a fresh random order, each as a ratio to the reference
variant of the same round."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

REFERENCE = "LoRA r=8"


@dataclass
class Series:
    """Seconds per run of one variant, and its ratio to the reference in the same round."""

    section: str
    name: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    unit: str = "s"  # or "tok/s" (higher is better) or "MB"


def interleaved(
    section: str, tasks: dict[str, Callable[[], float]], rounds: int, warmup: int, rng: random.Random, log
) -> dict[str, Series]:
    """Run every task once per round in a shuffled order; each task returns its own measured seconds."""
    series = {name: Series(section, name) for name in tasks}
    for _ in range(warmup):
        for task in tasks.values():
            task()
    for round_index in range(rounds):
        order = list(tasks)
        rng.shuffle(order)
        measured = {name: tasks[name]() for name in order}
        for name, seconds in measured.items():
            series[name].seconds.append(seconds)
            series[name].ratios.append(seconds / measured[REFERENCE])
        log(
            f"  {section} round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {s:.3f}s" for n, s in measured.items())
        )
    return series


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run_once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run_once


def eval_forward(model, input_ids):
    def call():
        with torch.inference_mode():
            model(input_ids=input_ids)

    return call


def training_step(model, input_ids):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def call():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


def generation(model, prompt, new_tokens: int):
    def call():
        with torch.inference_mode():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    return call
