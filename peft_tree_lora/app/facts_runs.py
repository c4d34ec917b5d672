"""The main job's runs: settings, arms, the compute-matched rank, the learning-rate sweep on validation people,
recall scoring, and one progress line per run."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..integrations.optim import router_lr_ratio_for
from ..tuner.errors import TreeLoraUsageError
from . import facts_data
from .people import ATTRIBUTES, generate_people
from .recall import exact_match, knowledge_bits
from .runner import TrainSettings, run_training

ROUTINGS = ("token", "block", "sequence")
ARM_KEYS = ("lora", "tree", "matched", "wide")  # --arms: LoRA r, the tree, the compute-matched LoRA, LoRA r*2**d


QUERY_BATCH = 64  # recall queries per forward pass (SmolLM2's 49k-word logits: ~16 MB per row and 64 rows)


@dataclass
class JobSettings:
    """Everything a run of the job depends on (written into results.json)."""

    model: str = "embedded"
    people: int = 16
    validation_people: int = 16
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-2  # chosen with --lr-sweep 1e-2,2e-2,4e-2 on the validation people (see the module docstring)
    lr_sweep: list[float] = field(default_factory=list)
    rank: int = 1
    depth: int = 3
    routing: str = "block"
    router_lr_ratio: float | None = None  # None: the ratio recommended for the routing (router_lr_ratio_for)
    layers: str = "last4"
    target_modules: str = "all-linear"
    warmup_fraction: float = 0.05
    evaluations: int = 4
    seed: int = 0
    threads: int | None = None
    arms: list[str] = field(default_factory=lambda: list(ARM_KEYS))
    sweep_only: bool = False

    def validate(self) -> None:
        for name in ("people", "validation_people", "epochs", "batch_size", "rank", "evaluations"):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.routing not in ROUTINGS:
            raise TreeLoraUsageError(f"--routing must be one of {', '.join(ROUTINGS)}; got {self.routing!r}.")
        if not 1 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--depth must be in 1..10 (depth 0 is a plain LoRA); got {self.depth}.")
        for lr in [self.lr, *self.lr_sweep]:
            if not 0 < lr < 1:
                raise TreeLoraUsageError(f"learning rates must be in (0, 1); got {lr}.")
        if not 0 <= self.warmup_fraction < 1:
            raise TreeLoraUsageError(f"--warmup-fraction must be in [0, 1); got {self.warmup_fraction}.")
        unknown = [arm for arm in self.arms if arm not in ARM_KEYS]
        if unknown or not self.arms:
            raise TreeLoraUsageError(f"--arms: give a comma list of {', '.join(ARM_KEYS)}; got {self.arms}.")
        if self.sweep_only and not self.lr_sweep:
            raise TreeLoraUsageError("--sweep-only needs --lr-sweep.")
        if self.router_lr_ratio is not None and not 0 < self.router_lr_ratio <= 1000:
            raise TreeLoraUsageError(f"--router-lr-ratio must be in (0, 1000]; got {self.router_lr_ratio}.")
        if self.threads is not None and self.threads < 1:
            raise TreeLoraUsageError(f"--threads must be >= 1; got {self.threads}.")


@dataclass
class Arm:
    key: str
    label: str
    kind: str  # "lora" or "tree"
    rank: int
    depth: int = 0
    routing: str = "block"


def copies_of(base: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A factory of fresh copies of the loaded base model (every arm starts from the same weights)."""

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base)

    return fresh


def job_arms(rank: int, depth: int, matched_rank: int, routing: str = "block") -> list[Arm]:
    wide = rank * 2**depth
    scope = f", {routing} routing"
    return [
        Arm(f"lora_r{rank}", f"LoRA r={rank}", "lora", rank),
        Arm("tree", f"TreeLoRA d={depth} r={rank}{scope}", "tree", rank, depth, routing),
        Arm("compute_matched", f"LoRA r={matched_rank} (compute-matched)", "lora", matched_rank),
        Arm(f"lora_r{wide}", f"LoRA r={wide}", "lora", wide),
    ]


def adapter_config(arm: Arm, target_modules: list[str], layers: list[int] | None):
    """The PEFT config of an arm; alpha = 2 x rank for every adapter (the same update scale for all)."""
    from peft import LoraConfig

    from ..tuner.config import TreeLoraConfig

    shared: dict[str, Any] = {"target_modules": list(target_modules), "task_type": "CAUSAL_LM", "lora_dropout": 0.0}
    if layers is not None:
        shared["layers_to_transform"] = list(layers)
    if arm.kind == "tree":
        return TreeLoraConfig(depth=arm.depth, r=arm.rank, lora_alpha=2 * arm.rank, routing=arm.routing, **shared)
    return LoraConfig(r=arm.rank, lora_alpha=2 * arm.rank, **shared)


def compute_matched_rank(tree_active_per_token: int, lora_params_per_rank: int) -> int:
    """The smallest LoRA rank whose parameters (every one active for every token) reach the tree's active count."""
    return max(1, math.ceil(tree_active_per_token / lora_params_per_rank))


def compute_matched(
    fresh: Callable[[], torch.nn.Module], settings: JobSettings, names: list[str], layers: list[int] | None
) -> dict[str, int]:
    """Attach the tree and a rank-1 LoRA to copies of the model and count: the tree's parameters active per token
    (one leaf per module plus the routers on the path) and LoRA's parameters per unit of rank."""
    from peft import get_peft_model

    tree_arm = Arm("tree", "", "tree", settings.rank, settings.depth, settings.routing)
    with _quiet_warnings():
        tree = get_peft_model(fresh(), adapter_config(tree_arm, names, layers))
        active = int(tree.base_model.parameter_counts()["active_per_token"])
        del tree
        lora = get_peft_model(fresh(), adapter_config(Arm("lora", "", "lora", 1), names, layers))
        per_rank = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        del lora
    return {
        "tree_active_per_token": active,
        "lora_params_per_rank": per_rank,
        "rank": compute_matched_rank(active, per_rank),
    }


def recall(model: torch.nn.Module, queries: list[facts_data.Query], tokenizer: Any) -> dict[str, Any]:
    """Exact-match recall of `queries` by the served model (eval mode), in batches of `QUERY_BATCH`."""
    pad = facts_data.start_token(tokenizer)
    correct: list[bool] = []
    for start in range(0, len(queries), QUERY_BATCH):
        correct += exact_match(model, queries[start : start + QUERY_BATCH], pad)
    attributes = [q[0] for q in queries]
    people = len(queries) // len(ATTRIBUTES)
    bits, accuracy = knowledge_bits(correct, attributes, people)
    return {"recall": sum(correct) / len(correct), "hits": sum(correct), "by_attribute": accuracy, "bits": bits}


def sweep_learning_rate(
    settings: JobSettings,
    fresh: Callable[[], torch.nn.Module],
    tokenizer: Any,
    names: list[str],
    layers: list[int] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train LoRA r and LoRA r*2**d at each rate of `settings.lr_sweep` on validation people (names after the
    test people's, facts of their own) and choose the rate with the best mean validation held-out recall (ties:
    the lower mean held-out loss). The test people take no part."""
    people = generate_people(settings.validation_people, settings.seed, skip=settings.people)
    train_blocks = facts_data.training_blocks(tokenizer, people, settings.epochs, settings.seed)
    eval_blocks = facts_data.held_out_blocks(tokenizer, people)
    queries = facts_data.recall_queries(tokenizer, people)
    seen_queries = facts_data.recall_queries(tokenizer, people, held_out=False)
    steps = max(1, train_blocks.shape[0] // settings.batch_size)
    wide = settings.rank * 2**settings.depth
    arms = [Arm("lora", f"LoRA r={settings.rank}", "lora", settings.rank), Arm("wide", f"LoRA r={wide}", "lora", wide)]
    rows = []
    for lr in settings.lr_sweep:
        for arm in arms:
            label = f"validation, lr {lr:g}: {arm.label}"
            say(label)
            result = run_training(
                label,
                fresh,
                train_blocks,
                eval_blocks,
                _train_settings(settings, steps, lr),
                adapter_config(arm, names, layers),
                callbacks=[ProgressLine(label, say.enabled)],
            )
            held = recall(result.model, queries, tokenizer)
            rows.append(
                {
                    "lr": lr,
                    "arm": arm.label,
                    "recall_held_out": held["recall"],
                    "accuracy_by_attribute": held["by_attribute"],
                    "recall_seen_paraphrase": recall(result.model, seen_queries, tokenizer)["recall"],
                    "held_out_loss": result.final_eval_loss,
                    "train_seconds": result.train_seconds,
                }
            )
            result.model = None
            say(
                f"    validation recall {held['recall']:.1%} (seen paraphrase "
                f"{rows[-1]['recall_seen_paraphrase']:.1%}), loss {result.final_eval_loss:.3f}, "
                f"{result.train_seconds:.0f} s"
            )

    def score(lr: float) -> tuple[float, float]:
        mine = [row for row in rows if row["lr"] == lr]
        return (
            sum(r["recall_held_out"] for r in mine) / len(mine),
            -sum(r["held_out_loss"] for r in mine) / len(mine),
        )

    chosen = max(settings.lr_sweep, key=score)
    say(f"learning rate {chosen:g} chosen on {len(people)} validation people")
    return {"validation_people": len(people), "rows": rows, "chosen": chosen}


def _train_settings(settings: JobSettings, steps: int, lr: float) -> TrainSettings:
    every = max(1, steps // settings.evaluations)
    return TrainSettings(
        steps=steps,
        batch_size=settings.batch_size,
        learning_rate=lr,
        eval_every=every,
        eval_batch_size=16,
        seed=settings.seed,
        warmup_steps=min(int(steps * settings.warmup_fraction), steps - 1),
        show_progress=False,  # the Trainer's own bars nest an eval bar and print log dicts; ProgressLine instead
        log_every=max(1, min(every, 10)),
        router_lr_ratio=router_lr_ratio_for(settings.routing, settings.rank, settings.router_lr_ratio),
    )


def load_model(spec: str) -> tuple[torch.nn.Module, Any, str]:
    """(model in eval mode, tokenizer, description) for 'embedded' or a local model folder."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        if spec == "embedded":
            from .embedded import load_embedded_model

            model, tokenizer = load_embedded_model()
            description = "SmolLM2-135M-Instruct (embedded, fp32)"
        else:
            path = Path(spec).expanduser()
            if not path.is_dir():
                raise TreeLoraUsageError(f"--model {spec!r}: give 'embedded' or a local model folder.")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            description = f"{path.name} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise TreeLoraUsageError("the facts job needs a fast tokenizer (it splits prompt and answer by offsets).")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer, description


def _check_fits(model: torch.nn.Module, *blocks: torch.Tensor) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(b.shape[1] for b in blocks)
    if isinstance(limit, int) and longest > limit:
        raise TreeLoraUsageError(f"a document has {longest} tokens, more than the model's context of {limit}.")


class _Say:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)


class ProgressLine(TrainerCallback):
    """One progress bar per run (tqdm on a terminal; otherwise a plain line at every held-out evaluation), with
    the latest training and held-out loss. Replaces the Trainer's bars (which nest an evaluation bar) and its
    printed log dictionaries."""

    def __init__(self, label: str, enabled: bool = True, stream: Any = None) -> None:
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.bar = None
        self.loss: float | None = None
        self.held_out: float | None = None
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, desc=f"    {self.label}", unit="step", file=self.stream, dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self._postfix()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.held_out = float(metrics["eval_loss"])
            self._postfix()
            if self.enabled and self.bar is None:
                print(
                    f"    step {state.global_step:>4}/{state.max_steps}  {self._numbers()}  "
                    f"({time.perf_counter() - self.started:.0f} s)",
                    file=self.stream,
                    flush=True,
                )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _numbers(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.held_out is not None:
            parts.append(f"held-out {self.held_out:.3f}")
        return ", ".join(parts)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._numbers(), refresh=False)


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
