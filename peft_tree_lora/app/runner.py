"""One training run, the same way for every caller (`tree-lora train`, `tree-lora compare`, the experiments): the HF
`Trainer` on fixed-length token blocks, held-out loss every few steps, and a `RunResult` that can be compared with
other runs' results.

A run is stopped cleanly by Ctrl-C: the first interrupt finishes the current step, evaluates, saves, and returns a
result marked `interrupted`; a second interrupt aborts at once. Each save writes a whole new folder next to the
output folder and swaps it in by renames (`integrations.files.staged_files`), so the output folder always holds one
complete save, never a mix of two.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..integrations.files import staged_files
from ..integrations.hub import save_pretrained as save_with_card
from ..integrations.optim import tree_lora_param_groups
from ..integrations.schedule import RouterFreezeCallback
from ..integrations.telemetry import RoutingTelemetryCallback
from ..tuner.errors import TreeLoraUsageError
from ..tuner.model import TreeLoraModel
from .data import BlockDataset

RUN_FILE = "tree_lora_run.json"  # written into every output folder: marks it as ours and holds the result


@dataclass
class TrainSettings:
    """What every run of a comparison shares. `eval_every` is in optimiser steps; `save_every` (optional) saves
    the adapter to the output folder every that many steps, on top of the final save."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    eval_every: int = 25
    eval_batch_size: int = 8
    seed: int = 0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    save_every: int | None = None
    show_progress: bool = True
    log_every: int = 10
    # routers learn at learning_rate * this (AdamW, as the other parameters); None: the ratio recommended for each
    # adapter's routing and rank, as create_tree_lora_optimizer and `tree-lora train` give
    router_lr_ratio: float | None = None
    router_learning_fraction: float = 1.0  # routers learn for this share of the steps, then freeze (< 1)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeLoraUsageError(f"{name} must be an integer >= 1; got {value!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise TreeLoraUsageError(f"learning rate must be in (0, 1); got {self.learning_rate!r}.")
        if self.save_every is not None and self.save_every < 1:
            raise TreeLoraUsageError(f"save_every must be >= 1 or None; got {self.save_every!r}.")
        if not 0 < self.router_learning_fraction <= 1:
            raise TreeLoraUsageError(
                f"router_learning_fraction must be in (0, 1]; got {self.router_learning_fraction!r}."
            )
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise TreeLoraUsageError(f"warmup steps must be in [0, steps={self.steps}); got {self.warmup_steps}.")


@dataclass
class RunResult:
    """The outcome of one run. `eval_curve` holds (step, tokens seen, held-out loss), starting at step 0.
    `active_params_per_token` counts the adapter parameters one token touches at inference (for a full fine-tune:
    every trainable parameter). `leaf_usage` maps each TreeLoRA module to how many held-out tokens (or sequences)
    took each leaf under hard routing; None for other adapters."""

    name: str
    trainable_params: int
    active_params_per_token: int
    eval_curve: list[tuple[int, int, float]]
    final_eval_loss: float
    final_perplexity: float
    train_seconds: float
    steps_done: int
    interrupted: bool = False
    leaf_usage: dict[str, list[int]] | None = None
    output_dir: str | None = None
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) if self.model is None else asdict(_without_model(self))
        data.pop("model", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        data = dict(data)
        data["eval_curve"] = [tuple(point) for point in data.get("eval_curve", [])]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "model"})


def _without_model(result: RunResult) -> RunResult:
    copy = RunResult(**{k: getattr(result, k) for k in result.__dataclass_fields__ if k != "model"})
    return copy


def run_training(
    name: str,
    model: PreTrainedModel | PeftModel | Callable[[], PreTrainedModel],
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    settings: TrainSettings,
    adapter_config: PeftConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    callbacks: Iterable[TrainerCallback] = (),
) -> RunResult:
    """Train `model` (or the model a factory returns) on `train_blocks` and evaluate on `eval_blocks`.

    With `adapter_config`, the adapter is attached first (after seeding, so its initialisation is the same for
    every run with the same seed); without it the model is trained as it is (a base model: full fine-tuning; a
    PeftModel: its trainable parameters). With `output_dir` the trained adapter (or model) is saved there with
    `RUN_FILE`. The returned result carries the trained model in `result.model`.
    """
    set_seed(settings.seed)
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    if adapter_config is not None:
        set_seed(settings.seed)
        model = get_peft_model(model, adapter_config)
    tree = _tree_tuner(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise TreeLoraUsageError(f"run {name!r}: the model has no trainable parameters.")
    active = tree.parameter_counts()["active_per_token"] if tree is not None else trainable

    block_length = train_blocks.shape[1]
    recorder = _EvalRecorder(settings.batch_size * settings.gradient_accumulation_steps * block_length)
    stopper = _InterruptStopper()
    all_callbacks: list[TrainerCallback] = [recorder, stopper, *_telemetry_callbacks(tree), *callbacks]
    if output_dir is not None and settings.save_every:
        all_callbacks.append(_PeriodicSaver(Path(output_dir), settings.save_every, name))

    scratch = tempfile.mkdtemp(prefix="tree-lora-trainer-")
    try:
        optimizer = None
        if settings.router_learning_fraction < 1 and tree is not None:
            all_callbacks.append(RouterFreezeCallback(int(settings.steps * settings.router_learning_fraction)))
        if tree is not None and (settings.router_lr_ratio != 1.0 or settings.router_learning_fraction < 1):
            groups = tree_lora_param_groups(
                model, settings.learning_rate, settings.router_lr_ratio, settings.weight_decay
            )
            optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
        trainer = _TimedTrainer(
            model=model,
            args=_training_arguments(settings, scratch),
            train_dataset=BlockDataset(train_blocks),
            eval_dataset=BlockDataset(eval_blocks),
            callbacks=all_callbacks,
            optimizers=(optimizer, None),
        )
        if not settings.show_progress:
            trainer.remove_callback(PrinterCallback)  # quiet means quiet: no per-log dictionaries either
        recorder.world_size = trainer.args.world_size
        with stopper.catching_interrupts():
            started = time.perf_counter()
            trainer.train()
            elapsed = time.perf_counter() - started
        steps_done = trainer.state.global_step
        if not recorder.curve or recorder.curve[-1][0] != steps_done:
            trainer.evaluate()
        train_seconds = max(elapsed - trainer.eval_seconds, 0.0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    model.eval()
    final_loss = recorder.curve[-1][2]
    result = RunResult(
        name=name,
        trainable_params=trainable,
        active_params_per_token=active,
        eval_curve=recorder.curve,
        final_eval_loss=final_loss,
        final_perplexity=math.exp(min(final_loss, 50.0)),
        train_seconds=train_seconds,
        steps_done=steps_done,
        interrupted=stopper.interrupted,
        leaf_usage=leaf_usage(model, eval_blocks, settings.eval_batch_size) if tree is not None else None,
        output_dir=str(output_dir) if output_dir is not None else None,
        model=model,
    )
    if output_dir is not None:
        save_atomically(model, Path(output_dir), result)
    return result


def leaf_usage(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, list[int]]:
    """How many tokens (sequences, for sequence routing) of `blocks` take each leaf of each TreeLoRA module under
    hard routing, summed over the blocks."""
    tree = _tree_tuner(model)
    if tree is None:
        return {}
    counts: dict[str, torch.Tensor] = {}
    leaves = tree.peft_config[tree.active_adapters[0]].num_leaves
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], batch_size):
                routes = tree.leaf_routes(blocks[start : start + batch_size])
                for module, leaf in routes.items():
                    found = torch.bincount(leaf.reshape(-1).cpu(), minlength=leaves)
                    counts[module] = found if module not in counts else counts[module] + found
    finally:
        model.train(was_training)
    return {module: [int(c) for c in leaf_counts] for module, leaf_counts in counts.items()}


def save_atomically(
    model: torch.nn.Module, output_dir: Path, run_info: dict[str, Any] | RunResult | None = None
) -> None:
    """Save the adapter (or model) into `output_dir` so that an interruption never leaves a half-written file:
    everything is written to a sibling folder first, which then replaces the folder whole (other files kept)."""
    with staged_files(output_dir) as staging:
        if isinstance(getattr(model, "base_model", None), TreeLoraModel):
            save_with_card(model, staging)
        else:
            model.save_pretrained(staging)
        if isinstance(run_info, RunResult):
            run_info = run_info.to_dict()
        if run_info is not None:
            (staging / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")


def _tree_tuner(model: torch.nn.Module) -> TreeLoraModel | None:
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, TreeLoraModel) else None


def _training_arguments(settings: TrainSettings, scratch: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=scratch,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        eval_on_start=True,
        prediction_loss_only=True,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=settings.log_every,
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.show_progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
    )


class _TimedTrainer(Trainer):
    """A Trainer that keeps the time spent evaluating, so that training time can be reported without it."""

    eval_seconds: float = 0.0

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - started


class _EvalRecorder(TrainerCallback):
    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.world_size = 1
        self.curve: list[tuple[int, int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            step = state.global_step
            point = (step, step * self.tokens_per_step * self.world_size, float(metrics["eval_loss"]))
            if self.curve and self.curve[-1][0] == step:
                self.curve[-1] = point
            else:
                self.curve.append(point)


class _InterruptStopper(TrainerCallback):
    """First Ctrl-C: stop after the current step (the run then evaluates and saves). Second: abort."""

    def __init__(self) -> None:
        self.interrupted = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_training_stop = True
        return control

    def catching_interrupts(self):
        stopper = self

        class _Scope:
            def __enter__(self):
                self.previous = None
                if threading.current_thread() is threading.main_thread():
                    self.previous = signal.getsignal(signal.SIGINT)
                    signal.signal(signal.SIGINT, self._handle)
                return self

            def _handle(self, signum, frame):
                stopper.interrupted = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
                print(
                    "\ninterrupted: finishing this step, then evaluating and saving (Ctrl-C again to abort)",
                    flush=True,
                )

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGINT, self.previous)
                return False

        return _Scope()


class _PeriodicSaver(TrainerCallback):
    def __init__(self, output_dir: Path, every: int, name: str) -> None:
        self.output_dir, self.every, self.name = output_dir, every, name

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every == 0 and state.is_world_process_zero:
            save_atomically(
                model, self.output_dir, {"name": self.name, "steps_done": state.global_step, "in_progress": True}
            )


def _telemetry_callbacks(tree: TreeLoraModel | None) -> list[TrainerCallback]:
    return [] if tree is None else [RoutingTelemetryCallback()]
