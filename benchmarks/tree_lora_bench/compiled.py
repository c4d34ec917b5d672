"""The `compile` section: each adapter's evaluation forward and training step, eager and `torch.compile`d
(Inductor), timed interleaved in the same rounds, so that compiled/eager ratios sit next to LoRA's own."""

from __future__ import annotations

import random
import statistics

import torch

from .measure import REFERENCE, Series, eval_forward, interleaved, timed, training_step


def graph_breaks(model, input_ids, training: bool) -> int:
    """How many graph breaks `torch.compile` meets in one call of `model` (traced, not compiled)."""
    model.train(training)

    def call(ids):
        outputs = model(input_ids=ids, labels=ids if training else None)
        return outputs.loss if training else outputs.logits

    torch._dynamo.reset()
    breaks = torch._dynamo.explain(call)(input_ids).graph_break_count
    torch._dynamo.reset()
    return breaks


def compile_section(
    models: dict, input_ids: torch.Tensor, rounds: int, rng: random.Random, log
) -> tuple[list[Series], list[str]]:
    """`models` maps a name (one of them `REFERENCE`) to an adapted model; every one is timed eager and compiled."""
    if REFERENCE not in models:
        raise ValueError(f"compile_section needs a {REFERENCE!r} model to take ratios against")
    results: list[Series] = []
    notes: list[str] = []
    for section, make_task, training in (
        ("compile: eval forward", eval_forward, False),
        ("compile: training step", training_step, True),
    ):
        tasks = {}
        for name, model in models.items():
            breaks = graph_breaks(model, input_ids, training)
            notes.append(f"{section}, {name}: {breaks} graph breaks")
            model.train(training)
            tasks[name] = timed(make_task(model, input_ids))
            compiled = torch.compile(model)
            tasks[f"{name}, compiled"] = timed(make_task(compiled, input_ids))
            log(f"  {section}: compiling {name} (first call)")
            tasks[f"{name}, compiled"]()
        series = interleaved(section, tasks, rounds, 1, rng, log)
        results += series.values()
        for name in models:
            eager, compiled = series[name].seconds, series[f"{name}, compiled"].seconds
            ratio = statistics.median(c / e for c, e in zip(compiled, eager))
            notes.append(f"{section}, {name}: compiled / eager {ratio:.3f} (median of {rounds} rounds)")
        torch._dynamo.reset()
    return results, notes
