"""Study 1: past saturation. Pretrain a tiny Llama from scratch on the embedded corpus until its held-out loss stops
improving, then go on for the same number of tokens five ways (full training, LoRA r, TreeLoRA token and sequence
routing, LoRA r * 2**d) and compare held-out loss, parameter counts and training time.

Every run goes through `runner.run_training` (the HF Trainer), like `tree-lora train` and `tree-lora compare`."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..app.data import load_corpus, tokenize_blocks
from ..app.runner import RunResult, TrainSettings, run_training
from ..tuner.errors import TreeLoraUsageError
from .common import DOCS_DIR, ByteTokenizer, adapter_arms, command_line, tiny_llama, versions, write_json

RESULT_FILE = "saturation.json"
PLOT_FILE = "saturation_loss.png"


@dataclass
class SaturationSettings:
    """Defaults meant to finish within 30 minutes on 2 idle CPU cores (on a loaded shared machine with one thread,
    the default run took 34 minutes).

    The model (hidden 160, 4 layers, 4 heads, SwiGLU 432, byte vocabulary, tied embeddings: 1.28 M parameters)
    is at the low end of the issue's 1-5 M range and still has several layers for the adapters to act on, so that
    about a million tokens of pretraining fit in minutes on 2 cores (on a shared, loaded machine, one thread, the
    default run pretrained at about 1 k tokens a second)."""

    hidden: int = 160
    layers: int = 4
    heads: int = 4
    intermediate: int = 432
    block_length: int = 128
    batch_size: int = 16
    pretrain_lr: float = 3e-3
    warmup_steps: int = 30
    eval_every: int = 40
    eval_blocks: int = 128
    patience: int = 4
    min_improvement: float = 0.01
    max_pretrain_steps: int = 640
    continue_steps: int = 128
    adapter_lr: float = 3e-3
    rank: int = 4
    depth: int = 3
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str = "embedded"

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate", "block_length", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise TreeLoraUsageError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}).")
        if self.patience < 1 or not 0 <= self.min_improvement < 1:
            raise TreeLoraUsageError("--patience must be >= 1 and --min-improvement in [0, 1).")
        if self.max_pretrain_steps <= self.warmup_steps or self.continue_steps <= self.warmup_steps:
            raise TreeLoraUsageError(
                f"--max-pretrain-steps and --continue-steps must exceed the warm-up ({self.warmup_steps} steps)."
            )
        if self.rank < 1 or not 0 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 0..10; got {self.rank}, {self.depth}.")
        if not self.seeds:
            raise TreeLoraUsageError("--seeds needs at least one seed.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_length


class StopAtPlateau(TrainerCallback):
    """The saturation criterion: stop once the best held-out loss of the last `patience` evaluations is not at
    least `min_improvement` (relative) below the best loss before them."""

    def __init__(self, patience: int, min_improvement: float) -> None:
        self.patience, self.min_improvement = patience, min_improvement
        self.losses: list[float] = []
        self.stopped_at_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return control
        self.losses.append(float(metrics["eval_loss"]))
        if plateau_reached(self.losses, self.patience, self.min_improvement) and self.stopped_at_step is None:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
        return control


def plateau_reached(losses: list[float], patience: int, min_improvement: float) -> bool:
    """True when the last `patience` losses improve on the best earlier loss by less than `min_improvement`."""
    if len(losses) <= patience:
        return False
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) > best_before * (1.0 - min_improvement)


class ConstantLearningRate(TrainerCallback):
    """Holds the learning rate constant after the warm-up during pretraining. The runner's linear decay would keep
    the loss falling until the rate reaches zero, so a plateau could not be told apart from the schedule."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if lr_scheduler is None:
            raise RuntimeError("the Trainer passed no learning-rate scheduler to its callbacks")
        warmup = self.warmup_steps
        lr_scheduler.lr_lambdas = [lambda step: min(1.0, (step + 1) / max(1, warmup))] * len(lr_scheduler.lr_lambdas)
        return control


def corpus_blocks(settings: SaturationSettings) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Training blocks in a fixed shuffled order (the pretraining pool first, fresh blocks for the continuation
    after it) and the first `eval_blocks` held-out blocks."""
    corpus = load_corpus(settings.data)
    tokenizer = ByteTokenizer()
    needed = (settings.max_pretrain_steps + settings.continue_steps) * settings.batch_size
    train = tokenize_blocks(tokenizer, corpus.train, settings.block_length)
    held_out = tokenize_blocks(tokenizer, corpus.held_out, settings.block_length, max_blocks=settings.eval_blocks)
    if train.shape[0] < needed:
        raise TreeLoraUsageError(
            f"the corpus gives {train.shape[0]} training blocks of {settings.block_length} bytes; this study needs "
            f"{needed} (fewer steps, a smaller batch or a larger corpus)."
        )
    if held_out.shape[0] == 0:
        raise TreeLoraUsageError("the corpus has too little held-out text for one evaluation block.")
    order = list(range(train.shape[0]))
    random.Random(1234).shuffle(order)
    return train[order], held_out, corpus.description


def run_saturation(settings: SaturationSettings, out_dir: Path = DOCS_DIR, show_progress: bool = True) -> dict:
    """Run the whole study, write `saturation.json` and the plot into `out_dir`, and return the result dict."""
    settings.validate()
    started = time.perf_counter()
    train, held_out, description = corpus_blocks(settings)
    pretrain_pool = train[: settings.max_pretrain_steps * settings.batch_size]
    first_fresh = pretrain_pool.shape[0]
    continue_pool = train[first_fresh : first_fresh + settings.continue_steps * settings.batch_size]

    def fresh_model():
        return tiny_llama(
            ByteTokenizer.vocab_size,
            settings.hidden,
            settings.layers,
            settings.heads,
            settings.intermediate,
            settings.block_length,
            seed=settings.seeds[0],
        )

    base_params = sum(p.numel() for p in fresh_model().parameters())
    stopper = StopAtPlateau(settings.patience, settings.min_improvement)
    _say(f"pretraining a {base_params / 1e6:.2f} M-parameter Llama until held-out loss stops improving", show_progress)
    pretrain = run_training(
        "pretrain",
        fresh_model,
        pretrain_pool,
        held_out,
        _train_settings(settings, settings.max_pretrain_steps, settings.pretrain_lr, settings.seeds[0], show_progress),
        callbacks=[ConstantLearningRate(settings.warmup_steps), stopper],
    )
    pretrain_tokens = pretrain.steps_done * settings.tokens_per_step
    stop_reason = (
        f"plateau criterion met at step {stopper.stopped_at_step}"
        if stopper.stopped_at_step is not None
        else f"step budget of {settings.max_pretrain_steps} reached before the plateau criterion was met"
    )
    _say(f"pretraining stopped: {stop_reason}; held-out loss {pretrain.final_eval_loss:.4f}", show_progress)
    base_state = {k: v.detach().clone() for k, v in pretrain.model.state_dict().items()}
    pretrain.model = None

    runs: dict[str, list[dict[str, Any]]] = {}
    arms = adapter_arms(settings.rank, settings.depth, include_full=True)
    for seed in settings.seeds:
        for arm in arms:
            _say(f"continuing from the pretrained model: {arm.label} (seed {seed})", show_progress)

            def saturated_model():
                model = fresh_model()
                model.load_state_dict(copy.deepcopy(base_state))
                return model

            lr = settings.pretrain_lr if arm.kind == "full" else settings.adapter_lr
            result = run_training(
                arm.key,
                saturated_model,
                continue_pool,
                held_out,
                _train_settings(settings, settings.continue_steps, lr, seed, show_progress),
                adapter_config=arm.adapter_config(),
            )
            runs.setdefault(arm.key, []).append(_summarise(result, seed, pretrain_tokens))
            result.model = None

    data = {
        "study": "saturation",
        "command": command_line(),
        "versions": versions(),
        "settings": asdict(settings),
        "corpus": description,
        "train_blocks_available": int(train.shape[0]),
        "held_out_tokens": int(held_out.numel()),
        "base_params": base_params,
        "pretrain": {
            "curve": [list(p) for p in pretrain.eval_curve],
            "steps": pretrain.steps_done,
            "tokens": pretrain_tokens,
            "final_loss": pretrain.final_eval_loss,
            "best_loss": min(p[2] for p in pretrain.eval_curve),
            "train_seconds": pretrain.train_seconds,
            "stop_reason": stop_reason,
            "plateau_reached": stopper.stopped_at_step is not None,
        },
        "continue_tokens": settings.continue_steps * settings.tokens_per_step,
        "arms": [{"key": a.key, "label": a.label, "kind": a.kind} for a in arms],
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_saturation

    plot_saturation(data, out_dir / PLOT_FILE)
    data["plot"] = PLOT_FILE
    write_json(out_dir / RESULT_FILE, data)
    return data


def _train_settings(settings: SaturationSettings, steps: int, lr: float, seed: int, show_progress: bool):
    return TrainSettings(
        steps=steps,
        batch_size=settings.batch_size,
        learning_rate=lr,
        eval_every=settings.eval_every,
        eval_batch_size=32,
        seed=seed,
        warmup_steps=settings.warmup_steps,
        show_progress=show_progress,
        log_every=max(1, settings.eval_every),
    )


def _summarise(result: RunResult, seed: int, offset_tokens: int) -> dict[str, Any]:
    usage = result.leaf_usage or {}
    return {
        "seed": seed,
        "curve": [[step, tokens + offset_tokens, loss] for step, tokens, loss in result.eval_curve],
        "final_loss": result.final_eval_loss,
        "trainable_params": result.trainable_params,
        "active_params_per_token": result.active_params_per_token,
        "train_seconds": result.train_seconds,
        "leaf_usage_entropy": leaf_usage_entropy(usage) if usage else None,
    }


def leaf_usage_entropy(usage: dict[str, list[int]]) -> float:
    """Mean over modules of the entropy of held-out leaf usage divided by its maximum, log(leaves): 1 when every
    leaf gets the same traffic, 0 when one leaf takes everything."""
    values = []
    for counts in usage.values():
        total = sum(counts)
        if total == 0 or len(counts) < 2:
            continue
        entropy = -sum(c / total * math.log(c / total) for c in counts if c)
        values.append(entropy / math.log(len(counts)))
    return sum(values) / len(values) if values else 0.0


def _say(message: str, show: bool) -> None:
    if show:
        print(f"[saturation] {message}", flush=True)
