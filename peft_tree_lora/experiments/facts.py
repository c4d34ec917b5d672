"""Study 2: knowledge capacity. N synthetic people, each with four facts stated in paraphrased templates; adapters
learn them on top of a tiny base that already knows the templates (from other people), and are scored by exact-match
recall of a paraphrase they never saw for that person. Facts stored become bits of knowledge (a lower bound from
Fano's inequality) per adapter parameter and per parameter active for a token, next to the ~2 bits per parameter
Allen-Zhu and Li (Physics of Language Models 3.3, 2024) measured for fully trained language models.

Every training run goes through `runner.run_training` (the HF Trainer); recall is one batched forward pass."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..app.people import (  # noqa: F401  (the study's data, re-exported for its readers)
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
    VALUE_COUNTS,
    YEARS,
    Person,
    generate_people,
    held_out_template,
    prompt_and_answer,
    statement,
    training_statements,
)
from ..app.recall import answers_correct, exact_match, fano_bits, knowledge_bits, soft_inference  # noqa: F401
from ..app.runner import TrainSettings, run_training
from ..tuner.errors import TreeLoraUsageError
from .common import DOCS_DIR, adapter_arms, command_line, read_json, tiny_llama, versions, write_json
from .facts_words import WordTokenizer, document_blocks, held_out_blocks, recall_queries  # noqa: F401

RESULT_FILE = "facts.json"
PLOT_FILE = "facts_capacity.png"


@dataclass
class FactsSettings:
    """Defaults meant to finish within 30 minutes on 2 idle CPU cores (on a loaded shared machine with one thread,
    the default run took 23 minutes).

    The model is a word-level Llama (hidden 64, 4 layers, 4 heads, SwiGLU 176, tied embeddings, about 0.23 M
    parameters), first trained in full on the biographies of `background` other people with all four paraphrases,
    so it knows the templates and how to look a name up; the adapters then learn `people` new ones. 80 background
    epochs take the base past memorising its own facts (40 left it at 29-48 %, a different point of that transition
    on every seed; see the capacity study's settings)."""

    people: list[int] = field(default_factory=lambda: [8, 32, 128])
    background: int = 200
    background_epochs: int = 80
    epochs: int = 60
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 176
    batch_size: int = 16
    base_batch_size: int = 32
    base_lr: float = 5e-3
    adapter_lr: float = 1e-2
    rank: int = 1
    depth: int = 3
    seeds: list[int] = field(default_factory=lambda: [0])

    def validate(self) -> None:
        if not self.people or min(self.people) < 1:
            raise TreeLoraUsageError(f"--people needs one or more counts >= 1; got {self.people}.")
        for name in (
            "background",
            "background_epochs",
            "epochs",
            "hidden",
            "layers",
            "heads",
            "batch_size",
            "base_batch_size",
        ):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise TreeLoraUsageError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}).")
        if self.rank < 1 or not 0 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 0..10; got {self.rank}, {self.depth}.")
        capacity = len(FIRST_NAMES) * len(LAST_NAMES)
        if self.background + max(self.people) > capacity:
            raise TreeLoraUsageError(
                f"background + people must stay within the {capacity} distinct names; got "
                f"{self.background} + {max(self.people)}."
            )
        if not self.seeds:
            raise TreeLoraUsageError("--seeds needs at least one seed.")


@dataclass
class TrainedBase:
    """One seed's base model after full training on the background people: its weights (`state`, to start every
    adapter run from), the trained model itself (`model`, dropped by the caller when done), the people, and the
    facts for the results page (`info`)."""

    seed: int
    state: dict[str, torch.Tensor]
    model: Any
    model_length: int
    background: list[Person]
    study_people: list[Person]
    info: dict[str, Any]


def pretrain_base(
    settings: Any,
    tokenizer: WordTokenizer,
    seed: int,
    study_count: int,
    show_progress: bool,
    say: Callable[[str], None],
) -> TrainedBase:
    """Train the base of one seed in full on `settings.background` people (all four paraphrases, through the
    runner) and draw `study_count` study people after them. `settings` is a `FactsSettings` or any settings object
    with its model and base fields (`hidden`, `layers`, `heads`, `intermediate`, `background`,
    `background_epochs`, `base_batch_size`, `base_lr`, `batch_size`)."""
    background = generate_people(settings.background, seed)
    study_people = generate_people(study_count, seed, skip=settings.background)
    base_train = document_blocks(tokenizer, background, settings.background_epochs, seed, include_held_out=True)
    base_eval = held_out_blocks(tokenizer, study_people[: min(64, len(study_people))])
    model_length = 2 * max(base_train.shape[1], 64)

    fresh_model = functools.partial(facts_model, settings, tokenizer.vocab_size, model_length, seed, None)

    say(f"seed {seed}: training the base on {settings.background} background people")
    base_steps = max(1, base_train.shape[0] // settings.base_batch_size)
    base = run_training(
        "base",
        fresh_model,
        base_train,
        base_eval,
        train_settings(settings, base_steps, settings.base_lr, seed, show_progress, settings.base_batch_size),
    )
    base_state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    background_queries = recall_queries(tokenizer, background[:256])
    background_recall = exact_match(base.model, background_queries, tokenizer.eos_token_id)
    info = {
        "seed": seed,
        "params": sum(p.numel() for p in base.model.parameters()),
        "steps": base.steps_done,
        "train_seconds": base.train_seconds,
        "background_recall": sum(background_recall) / len(background_recall),
    }
    say(f"seed {seed}: base recalls {info['background_recall']:.1%} of background facts")
    return TrainedBase(seed, base_state, base.model, model_length, background, study_people, info)


def recall_scores(
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    people: list[Person],
    queries: list[tuple[str, list[int], list[int]]] | None = None,
) -> dict[str, Any]:
    """Held-out-paraphrase recall of `people` under the model's inference routing, recall of a seen paraphrase,
    facts recalled, accuracy per attribute and bits (Fano lower bound). `queries` defaults to
    `recall_queries(tokenizer, people)`."""
    queries = recall_queries(tokenizer, people) if queries is None else queries
    held = exact_match(model, queries, tokenizer.eos_token_id)
    seen = exact_match(model, recall_queries(tokenizer, people, held_out=False), tokenizer.eos_token_id)
    bits, accuracy = knowledge_bits(held, [q[0] for q in queries], len(people))
    return {
        "recall": sum(held) / len(held),
        "recall_seen_paraphrase": sum(seen) / len(seen),
        "facts_recalled": sum(held),
        "accuracy_by_attribute": accuracy,
        "bits": bits,
    }


def run_facts(
    settings: FactsSettings, out_dir: Path = DOCS_DIR, show_progress: bool = True, append: bool = False
) -> dict:
    """Run the whole study, write `facts.json` and the plot into `out_dir`, and return the result dict. With
    `append`, the new seeds' runs are added to the `facts.json` already there (same settings but the seeds)."""
    previous = read_json(out_dir / RESULT_FILE) if append else None
    if previous is not None:
        _check_appendable(previous, settings)
    settings.validate()
    started = time.perf_counter()
    tokenizer = WordTokenizer()
    arms = adapter_arms(settings.rank, settings.depth, include_full=False)
    runs: list[dict[str, Any]] = []
    bases: list[dict[str, Any]] = []
    for seed in settings.seeds:
        base = pretrain_base(
            settings, tokenizer, seed, max(settings.people), show_progress, lambda m: _say(m, show_progress)
        )
        bases.append(base.info)
        for people_count in settings.people:
            people = base.study_people[:people_count]
            queries = recall_queries(tokenizer, people)
            before = exact_match(base.model, queries, tokenizer.eos_token_id)
            train_blocks = document_blocks(tokenizer, people, settings.epochs, seed, include_held_out=False)
            eval_blocks = held_out_blocks(tokenizer, people[:64])
            steps = max(1, train_blocks.shape[0] // settings.batch_size)
            for arm in arms:
                _say(f"seed {seed}: N={people_count}, {arm.label}", show_progress)

                result = run_training(
                    arm.key,
                    functools.partial(
                        facts_model, settings, tokenizer.vocab_size, base.model_length, seed, base.state
                    ),
                    train_blocks,
                    eval_blocks,
                    train_settings(settings, steps, settings.adapter_lr, seed, show_progress),
                    adapter_config=arm.adapter_config(),
                )
                scores = recall_scores(result.model, tokenizer, people, queries)
                bits = scores["bits"]
                runs.append(
                    {
                        "seed": seed,
                        "people": people_count,
                        "arm": arm.key,
                        "recall": scores["recall"],
                        "recall_before": sum(before) / len(before),
                        "recall_seen_paraphrase": scores["recall_seen_paraphrase"],
                        "facts_recalled": scores["facts_recalled"],
                        "accuracy_by_attribute": scores["accuracy_by_attribute"],
                        "bits": bits,
                        "trainable_params": result.trainable_params,
                        "active_params_per_token": result.active_params_per_token,
                        "bits_per_adapter_param": bits / result.trainable_params,
                        "bits_per_active_param": bits / result.active_params_per_token,
                        "final_held_out_loss": result.final_eval_loss,
                        "train_seconds": result.train_seconds,
                        "steps": result.steps_done,
                    }
                )
                _say(
                    f"  held-out recall {runs[-1]['recall']:.1%} "
                    f"(seen paraphrase {runs[-1]['recall_seen_paraphrase']:.1%}), "
                    f"{bits:.0f} bits, {runs[-1]['bits_per_adapter_param']:.3f} bits/param",
                    show_progress,
                )
                result.model = None
        base.model = None

    data = {
        "study": "facts",
        "command": command_line(),
        "versions": versions(),
        "settings": asdict(settings),
        "attributes": {a: VALUE_COUNTS[a] for a in ATTRIBUTES},
        "bits_per_person": sum(math.log2(v) for v in VALUE_COUNTS.values()),
        "vocab_size": tokenizer.vocab_size,
        "bases": bases,
        "arms": [{"key": a.key, "label": a.label, "kind": a.kind} for a in arms],
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    if previous is not None:
        data = merge_results(previous, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_facts

    plot_facts(data, out_dir / PLOT_FILE)
    data["plot"] = PLOT_FILE
    write_json(out_dir / RESULT_FILE, data)
    return data


def _check_appendable(previous: dict[str, Any], settings: FactsSettings) -> None:
    old = {k: v for k, v in previous["settings"].items() if k != "seeds"}
    new = {k: v for k, v in asdict(settings).items() if k != "seeds"}
    if old != new:
        changed = sorted(k for k in new if old.get(k) != new[k])
        raise TreeLoraUsageError(f"--append needs the settings of the existing facts.json; these differ: {changed}.")
    repeated = set(previous["settings"]["seeds"]) & set(settings.seeds)
    if repeated:
        raise TreeLoraUsageError(f"--append: seeds {sorted(repeated)} are already in the existing facts.json.")


def merge_results(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One result holding the runs of both (same settings, different seeds); the commands are listed in order."""
    merged = dict(new)
    commands = previous["command"] if isinstance(previous["command"], list) else [previous["command"]]
    merged["command"] = [*commands, new["command"]]
    merged["settings"] = {**new["settings"], "seeds": previous["settings"]["seeds"] + new["settings"]["seeds"]}
    merged["bases"] = previous["bases"] + new["bases"]
    merged["runs"] = previous["runs"] + new["runs"]
    merged["wall_seconds"] = previous["wall_seconds"] + new["wall_seconds"]
    return merged


def facts_model(
    settings: Any, vocab_size: int, length: int, seed: int, state: dict[str, torch.Tensor] | None
) -> torch.nn.Module:
    """The study's tiny Llama, fresh or (with `state`) a copy of the trained base; `settings` is any settings object
    with `hidden`, `layers`, `heads` and `intermediate`."""
    model = tiny_llama(
        vocab_size, settings.hidden, settings.layers, settings.heads, settings.intermediate, length, seed=seed
    )
    if state is not None:
        model.load_state_dict(copy.deepcopy(state))
    return model


def train_settings(
    settings: Any, steps: int, lr: float, seed: int, show_progress: bool, batch_size: int | None = None
) -> TrainSettings:
    """The runner settings of one run: held-out loss four times a run, a warm-up of a tenth of the steps (at most
    10), and the batch size of `settings` unless `batch_size` is given."""
    return TrainSettings(
        steps=steps,
        batch_size=batch_size or settings.batch_size,
        learning_rate=lr,
        eval_every=max(1, steps // 4),
        eval_batch_size=64,
        seed=seed,
        warmup_steps=min(10, steps // 10),
        show_progress=show_progress,
        log_every=max(1, steps // 4),
    )


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[facts] {message}", flush=True)
