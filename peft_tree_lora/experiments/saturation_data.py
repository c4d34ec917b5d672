"""The saturation study's data and training controls: the corpus blocks and per-seed pools, the plateau criterion,
a constant learning rate for pretraining, and held-out loss."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..app.data import load_corpus, tokenize_blocks
from ..tuner.errors import TreeLoraUsageError
from .common import ByteTokenizer

HELD_OUT_SHUFFLE_SEED = 1234  # fixes which held-out blocks are validation and which are test, for every seed


@dataclass
class SaturationSettings:
    """Defaults sized to finish within about 30 minutes on 2 CPU cores with one torch thread; the timings behind
    them (one torch thread, 16 x 128-byte blocks a step, measured on this 2-core machine, idle unless noted):

    - The 1.28 M-parameter model of the previous run was still falling 5 % per 160 steps after 640 steps. At one
      thread a training step costs 0.18 s (hidden 64, 4 layers, 0.22 M parameters; loaded machine), 0.094-0.116 s
      (hidden 48, 3 layers, 95 k) and 0.057-0.069 s (hidden 32, 3 layers, 48 k), evaluation 1-4 ms a block.
    - Pretraining curves at a constant 3e-3 (1e-2 learns slower): none of them flattens out within the data (4.7 M
      bytes, so longer runs repeat the pool). After 2,200 steps the 0.22 M and 95 k models still fall about 0.5 %
      per 100 steps; the 95 k model at 4,000 steps still 1.5 % per 1,000 steps. The 48 k model (hidden 32, 3 layers)
      falls below 1 % per 1,000 steps from about 4,800 steps on (1.666 -> 1.634 by step 6,000, 416 s): with the
      criterion below (best of the last 10 evaluations, 1,000 steps or 2 M tokens, less than 1 % under the best
      before) it stops at 4,800 on seed 0. Shorter windows (200-500 steps) stop on noise as early as step 1,150,
      after which the loss fell another 8 %.
    - Continuation, 250 steps from that seed-0 base (train seconds): full 13, LoRA r=4 16, LoRA r=16 18, the d=3
      r=2 tree 55 (hard routing costs about 3.5 LoRA steps). At learning rate 3e-3 against 1e-2 on the validation
      blocks: full 0.047 against 0.016 gain, LoRA r=4 0.039 against 0.040, the tree 0.045 against 0.042, LoRA
      r=16 0.046 against 0.043; so every arm uses 3e-3, the pretraining rate (seed 0 is not a study seed).
    - Budget: about 300 s of pretraining and 200 s of continuation a seed, 25 min for three seeds; at most
      `max_pretrain_steps` (8,000 steps, about 400 s) a seed if the plateau comes late. The default run (1 December
      2026, `--threads 1`, load average about 1) took 18.8 min: plateaus at steps 5,600, 5,100 and 5,000 (207-246 s
      of pretraining each), about 125 s of continuation training a seed (the token-routed tree 40-49 s of it).

    `rank` 2 keeps LoRA r * 2**d (16) below the hidden size (32), so that it is still a low-rank arm."""

    hidden: int = 32
    layers: int = 3
    heads: int = 4
    intermediate: int = 96
    block_length: int = 128
    batch_size: int = 16
    pretrain_lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 100
    continue_eval_every: int = 50
    eval_blocks: int = 256
    test_blocks: int = 1024
    patience: int = 10
    min_improvement: float = 0.01
    max_pretrain_steps: int = 8000
    continue_steps: int = 250
    adapter_lr: float = 3e-3
    rank: int = 2
    depth: int = 3
    tree_token: bool = True
    tree_sequence: bool = True
    plateau_control: bool = True
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    data: str = "embedded"

    def validate(self) -> None:
        for name in (
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "block_length",
            "batch_size",
            "eval_every",
            "continue_eval_every",
            "eval_blocks",
            "test_blocks",
        ):
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
        if self.rank < 1 or not 1 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 1..10; got {self.rank}, {self.depth}.")
        for name in ("pretrain_lr", "adapter_lr"):
            if not 0 < getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be in (0, 1); got {getattr(self, name)}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TreeLoraUsageError(f"--seeds needs one or more distinct seeds; got {self.seeds}.")

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


@dataclass
class Blocks:
    """The corpus as token blocks: every training block (in corpus order), the validation and the test blocks."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    description: str


def corpus_blocks(settings: SaturationSettings) -> Blocks:
    """Training blocks and two disjoint sets of held-out blocks (validation, then test) drawn from the held-out
    documents in one fixed shuffled order."""
    corpus = load_corpus(settings.data)
    tokenizer = ByteTokenizer()
    train = tokenize_blocks(tokenizer, corpus.train, settings.block_length)
    held_out = tokenize_blocks(tokenizer, corpus.held_out, settings.block_length)
    needed = (settings.continue_steps + 1) * settings.batch_size
    if train.shape[0] < needed:
        raise TreeLoraUsageError(
            f"the corpus gives {train.shape[0]} training blocks of {settings.block_length} bytes; this study needs "
            f"more than the {settings.continue_steps * settings.batch_size} it keeps for the continuation (fewer "
            "continuation steps, a smaller batch or a larger corpus)."
        )
    if held_out.shape[0] < 2:
        raise TreeLoraUsageError("the corpus has too little held-out text for a validation and a test block.")
    order = list(range(held_out.shape[0]))
    random.Random(HELD_OUT_SHUFFLE_SEED).shuffle(order)
    validation_count = min(settings.eval_blocks, held_out.shape[0] // 2)
    test_count = min(settings.test_blocks, held_out.shape[0] - validation_count)
    validation = held_out[order[:validation_count]]
    test = held_out[order[validation_count : validation_count + test_count]]
    return Blocks(train, validation, test, corpus.description)


def seed_pools(settings: SaturationSettings, train: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In a shuffled order of the training blocks that depends on the seed: the last `continue_steps x batch_size`
    blocks are kept for the continuation (fresh: pretraining never draws them), the rest is the pretraining pool,
    which pretraining goes through again (in a new order each epoch) when it needs more steps than the pool has."""
    order = list(range(train.shape[0]))
    random.Random(seed).shuffle(order)
    shuffled = train[order]
    kept = settings.continue_steps * settings.batch_size
    return shuffled[:-kept], shuffled[-kept:]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss on `blocks` in evaluation mode (as served: the adapter's inference routing, one leaf),
    weighted by block like the runner's evaluation."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    model.train(was_training)
    return total / blocks.shape[0]
