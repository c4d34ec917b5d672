"""The main job: teach a pretrained model synthetic facts it cannot know, and compare how well four adapters of the
same shape family store them.

N synthetic people (names never seen together, facts drawn at random) each have four facts; every fact has four
paraphrases. Training shows short biographies (one statement per fact, three of the four paraphrases, rotating
with the epoch); recall is asked in the fourth paraphrase, which training never showed for that person (it shows
it for other people). Compared, with the same optimiser, steps, learning rate, batch, seed and target modules:

- LoRA r (default r=1);
- TreeLoRA depth d, rank r (default d=3: 8 leaves of rank 1), token routing, the default (hard) training routing;
- the compute-matched LoRA: the smallest rank whose parameters (all active for every token) are at least the
  tree's parameters active per token, routers included (`parameter_counts()["active_per_token"]`), computed from
  the adapters attached to the model, never hard-coded;
- the wide LoRA r*2**d: as many adapter parameters as all the tree's leaves.

Per arm: exact-match recall of the held-out paraphrase (the served model in eval mode; one forward pass, the true
prompt fed in: greedy decoding writes the answer iff the arg-max at every answer position is the answer token),
recall of a seen paraphrase (memorisation), the runner's held-out loss on the held-out-paraphrase statements,
active parameters per token, trainable parameters and train time. Output: one progress line per run and a final
table on the console; `report.md`, `results.json`, `recall.png`, `heldout_loss.png` and the tree's leaf usage in
the output folder, each written to a temporary file and moved into place.

The learning rate is the same for every arm. It was chosen with `--lr-sweep`, which trains LoRA r and LoRA r*2**d
at each given rate on *validation* people (other names and facts than the test people) and keeps the rate with the
best mean validation recall; the test recall never takes part.

Defaults (the demo): 16 test people (64 facts), 40 biographies each (640 documents of at most 57 SmolLM2 tokens,
padded), 80 steps of 8 documents, lr 2e-2 (5% warm-up, linear decay, AdamW), all seven linear modules of the last
4 of SmolLM2's 30 layers (so the backward pass stops early), alpha = 2 x rank, seed 0. Compute-matched rank on
SmolLM2: the tree touches 100,692 parameters per token (40,704 in its leaf, 59,988 in its routers), LoRA has
40,704 per rank, so rank 3.

Measurements (embedded SmolLM2-135M-Instruct, fp32, 2 CPU cores shared with 2-3 other jobs, torch 2 threads,
OMP_WAIT_POLICY=PASSIVE):

- model load ~1 s (after the one-time GGUF conversion, ~50 s); one training step of 8 x <=57 tokens takes
  1.1-1.3 s at load average ~2.3 and 3.3-3.5 s at load average ~3.5 (the other jobs take the cores); a LoRA run
  of 80 steps with 5 held-out evaluations and both recall passes took 90-105 s (load ~2.3) to 275 s (load ~3.5).
- 12 steps (3 biographies per person, 32 people) teach nothing: 0-2% held-out recall for every arm.
- learning-rate sweep on 16 validation people (`--people 16 --validation-people 16 --epochs 40 --lr-sweep
  1e-2,2e-2,4e-2 --sweep-only`), validation held-out recall (seen-paraphrase recall):

  | lr   | LoRA r=1      | LoRA r=8      | mean  |
  | ---: | ---:          | ---:          | ---:  |
  | 1e-2 | 7.8% (20.3%)  | 29.7% (75.0%) | 18.8% |
  | 2e-2 | 12.5% (29.7%) | 37.5% (71.9%) | 25.0% |
  | 4e-2 | 14.1% (34.4%) | 0.0% (0.0%, diverged) | 7.0% |

  so 2e-2 is the default for every arm.
- `python3 tasks.py demo` (the defaults), two full runs, identical results (deterministic on CPU): 10.2 min wall
  at load average ~2.9 throughout, and 9.1 min (548 s) at load average 2.0-3.9 (two other jobs on the 2 cores).
  Training times of the second run: 139 s (LoRA r=1, load ~3.8), 162 s (tree), 77 s (LoRA r=3) and 85 s
  (LoRA r=8, load ~2); the rest is evaluation and loading. Held-out recall 7.8% / 29.7% / 26.6% / 28.1% (seen
  paraphrase 25% / 48% / 50% / 47%): LoRA r=1 is capacity-bound against LoRA r=8; the tree, the compute-matched
  LoRA r=3 and LoRA r=8 are within noise of each other on 64 facts (2 s.e. ~16 points). Not measured on an idle
  machine: at the ~1 s per step the arms got at load ~2, the whole job takes ~6.5 min.

Run standalone as `python -m peft_tree_lora.app.facts_job [options]`, or as a `tree-lora` sub-command through the
CLI's plug-in table (`configure_parser(parser)` and `run(args) -> int`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..experiments.facts import ATTRIBUTES, VALUE_COUNTS, exact_match, generate_people, knowledge_bits
from ..tuner.errors import TreeLoraUsageError
from . import facts_data
from .runner import RunResult, TrainSettings, run_training

COMMAND_FILE = "tree_lora_command.json"  # the same marker as the CLI's: this folder is a tree-lora output
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
RECALL_PLOT = "recall.png"
LOSS_PLOT = "heldout_loss.png"
LEAF_PLOT = "leaf_usage_tree.png"
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
        if self.threads is not None and self.threads < 1:
            raise TreeLoraUsageError(f"--threads must be >= 1; got {self.threads}.")


@dataclass
class Arm:
    key: str
    label: str
    kind: str  # "lora" or "tree"
    rank: int
    depth: int = 0


# --- the command line -----------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The job's options, on `parser` (the CLI's sub-command parser, or the standalone one)."""
    defaults = JobSettings()
    parser.description = (
        "Teach the model synthetic facts (N people, paraphrased statements), hold one paraphrase per fact out, "
        "and compare held-out-paraphrase recall of LoRA r, TreeLoRA d x r, the compute-matched LoRA and LoRA "
        "r*2**d. Writes report.md, results.json and plots."
    )
    parser.add_argument("--model", default=defaults.model, help="'embedded' (SmolLM2-135M-Instruct) or a folder")
    parser.add_argument("--output-dir", "-o", default="runs/facts", help="folder for report.md, results, plots")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier tree-lora output there")
    group = parser.add_argument_group("facts")
    group.add_argument("--people", type=int, default=defaults.people, help="test people (4 facts each)")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="biographies per person in training")
    group.add_argument(
        "--validation-people", type=int, default=defaults.validation_people, help="people for --lr-sweep"
    )
    group = parser.add_argument_group("adapters")
    group.add_argument("--rank", "-r", type=int, default=defaults.rank, help="LoRA rank and tree leaf rank")
    group.add_argument("--depth", type=int, default=defaults.depth, help="tree depth (2**depth leaves)")
    group.add_argument("--layers", default=defaults.layers, help="'all', 'lastN' or a comma list of layer indices")
    group.add_argument(
        "--target-modules", default=defaults.target_modules, help="'all-linear' or a comma list of module names"
    )
    group = parser.add_argument_group("training (the same for every arm)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of every arm")
    group.add_argument(
        "--lr-sweep",
        default="",
        help="comma list of rates: choose the rate on validation people first (LoRA r and LoRA r*2**d)",
    )
    group.add_argument("--sweep-only", action="store_true", help="stop after --lr-sweep (no test arms)")
    group.add_argument("--arms", default=",".join(ARM_KEYS), help=f"arms to run, of {','.join(ARM_KEYS)}")
    group.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    group.add_argument("--evaluations", type=int, default=defaults.evaluations, help="held-out losses per run")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    group.add_argument("--quiet", action="store_true", help="no progress lines")


def settings_from_args(args: argparse.Namespace) -> JobSettings:
    try:
        sweep = [float(part) for part in args.lr_sweep.split(",") if part.strip()]
    except ValueError:
        raise TreeLoraUsageError(f"--lr-sweep {args.lr_sweep!r}: give a comma list of numbers.") from None
    settings = JobSettings(
        model=args.model,
        people=args.people,
        validation_people=args.validation_people,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_sweep=sweep,
        rank=args.rank,
        depth=args.depth,
        layers=args.layers,
        target_modules=args.target_modules,
        warmup_fraction=args.warmup_fraction,
        evaluations=args.evaluations,
        seed=args.seed,
        threads=args.threads,
        arms=[part.strip() for part in args.arms.split(",") if part.strip()],
        sweep_only=args.sweep_only,
    )
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    settings = settings_from_args(args)
    output = Path(args.output_dir).expanduser()
    check_output_dir(output, args.overwrite)
    argv = getattr(args, "argv", None)
    if getattr(args, "command", None) and argv is not None:  # a tree-lora sub-command: argv starts with its name
        command = "tree-lora " + shlex.join(argv)
    else:
        command = shlex.join(["python", "-m", "peft_tree_lora.app.facts_job", *(argv or sys.argv[1:])])
    data = run_job(settings, output, command, show_progress=not args.quiet)
    if data["arms"]:
        print("\n" + results_table(data))
        print(f"\n{data['verdict']}")
    print(f"\nreport: {output / REPORT_FILE}  ({data['wall_seconds'] / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_tree_lora.app.facts_job")
    configure_parser(parser)
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    args.argv = arguments
    try:
        return run(args)
    except TreeLoraUsageError as error:
        print(f"facts_job: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facts_job: interrupted", file=sys.stderr)
        return 130


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a folder holding anything but an earlier tree-lora output, and such an output without --overwrite."""
    if path.exists() and not path.is_dir():
        raise TreeLoraUsageError(f"--output-dir {str(path)!r} is a file; give a new or empty folder.")
    if not path.exists() or not any(path.iterdir()):
        return
    if not (path / COMMAND_FILE).is_file():
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} exists and holds other files; give a new or empty folder "
            "(only an earlier tree-lora output is replaced, with --overwrite)."
        )
    if not overwrite:
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} holds an earlier tree-lora output; add --overwrite to replace it."
        )


# --- the job --------------------------------------------------------------------------------------------------


def run_job(settings: JobSettings, output: Path, command: str, show_progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison, write the report, JSON and plots into `output`, and return the results."""
    settings.validate()
    started = time.perf_counter()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    say = _Say(show_progress)
    base, tokenizer, model_description = load_model(settings.model)
    fresh = copies_of(base)
    names = target_module_names(settings.target_modules, base)
    layers = parse_layers(settings.layers, number_of_layers(base))

    test_people = generate_people(settings.people, settings.seed)
    train_blocks = facts_data.training_blocks(tokenizer, test_people, settings.epochs, settings.seed)
    eval_blocks = facts_data.held_out_blocks(tokenizer, test_people)
    held_queries = facts_data.recall_queries(tokenizer, test_people, held_out=True)
    seen_queries = facts_data.recall_queries(tokenizer, test_people, held_out=False)
    _check_fits(base, train_blocks, eval_blocks)
    steps = max(1, train_blocks.shape[0] // settings.batch_size)

    matched = compute_matched(fresh, settings, names, layers)
    arms = [
        arm
        for key, arm in zip(ARM_KEYS, job_arms(settings.rank, settings.depth, matched["rank"]))
        if key in settings.arms and not settings.sweep_only
    ]
    _write_marker(output, command)
    say(
        f"{model_description}; {settings.people} people x {len(ATTRIBUTES)} facts, {settings.epochs} biographies "
        f"each ({train_blocks.shape[0]} documents of <= {train_blocks.shape[1]} tokens); {steps} steps of "
        f"{settings.batch_size}; adapters on {', '.join(names)} in {_layers_text(layers)}"
    )
    say(
        f"compute-matched LoRA: the tree touches {matched['tree_active_per_token']:,} parameters per token "
        f"(leaf + routers); LoRA has {matched['lora_params_per_rank']:,} per rank -> rank {matched['rank']}"
    )
    base_recall = recall(base, held_queries, tokenizer)
    say(f"base model before training: held-out-paraphrase recall {base_recall['recall']:.1%}")

    lr_selection = None
    lr = settings.lr
    if settings.lr_sweep:
        lr_selection = sweep_learning_rate(settings, fresh, tokenizer, names, layers, say)
        lr = lr_selection["chosen"]

    train_settings = _train_settings(settings, steps, lr)
    results: list[RunResult] = []
    runs = []
    for index, arm in enumerate(arms):
        say(f"[{index + 1}/{len(arms)}] {arm.label}")
        result = run_training(
            arm.label,
            fresh,
            train_blocks,
            eval_blocks,
            train_settings,
            adapter_config(arm, names, layers),
            callbacks=[ProgressLine(arm.label, show_progress)],
        )
        held = recall(result.model, held_queries, tokenizer)
        seen = recall(result.model, seen_queries, tokenizer)
        result.model = None
        results.append(result)
        runs.append(
            {
                **asdict(arm),
                "recall_held_out": held["recall"],
                "recall_seen_paraphrase": seen["recall"],
                "facts_recalled": held["hits"],
                "accuracy_by_attribute": held["by_attribute"],
                "bits": held["bits"],
                "held_out_loss": result.final_eval_loss,
                "held_out_loss_curve": [list(point) for point in result.eval_curve],
                "active_params_per_token": result.active_params_per_token,
                "trainable_params": result.trainable_params,
                "train_seconds": result.train_seconds,
                "steps": result.steps_done,
                "interrupted": result.interrupted,
                "leaf_usage": result.leaf_usage,
            }
        )
        say(
            f"    held-out recall {held['recall']:.1%}, seen paraphrase {seen['recall']:.1%}, "
            f"held-out loss {result.final_eval_loss:.3f}, {result.train_seconds:.0f} s"
        )
        if result.interrupted:
            break
    for run in runs:
        if run["key"] == "compute_matched" and run["trainable_params"] < matched["tree_active_per_token"]:
            raise RuntimeError(f"the compute-matched LoRA has fewer parameters than the tree's active ones: {run}")

    data = {
        "job": "facts",
        "command": command,
        "model": model_description,
        "machine": machine_description(),
        "versions": _versions(),
        "settings": asdict(settings),
        "learning_rate": lr,
        "lr_selection": lr_selection,
        "people": settings.people,
        "facts": settings.people * len(ATTRIBUTES),
        "attributes": {a: VALUE_COUNTS[a] for a in ATTRIBUTES},
        "documents": {"train": list(train_blocks.shape), "held_out": list(eval_blocks.shape)},
        "steps": steps,
        "target_modules": names,
        "layers": layers,
        "compute_matched": matched,
        "base_recall_held_out": base_recall["recall"],
        "arms": runs,
    }
    data["verdict"] = verdict(data)
    data["wall_seconds"] = time.perf_counter() - started
    write_outputs(data, results, output)
    return data


def copies_of(base: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A factory of fresh copies of the loaded base model (every arm starts from the same weights)."""

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base)

    return fresh


def job_arms(rank: int, depth: int, matched_rank: int) -> list[Arm]:
    wide = rank * 2**depth
    return [
        Arm(f"lora_r{rank}", f"LoRA r={rank}", "lora", rank),
        Arm("tree", f"TreeLoRA d={depth} r={rank}", "tree", rank, depth),
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
        return TreeLoraConfig(depth=arm.depth, r=arm.rank, lora_alpha=2 * arm.rank, routing="token", **shared)
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

    tree_arm = Arm("tree", "", "tree", settings.rank, settings.depth)
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
    )


# --- models ---------------------------------------------------------------------------------------------------


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


def number_of_layers(model: torch.nn.Module) -> int:
    value = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(value, int):
        raise TreeLoraUsageError("cannot tell how many layers this model has; use --layers all.")
    return value


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """None for every layer, else the sorted layer indices: 'all', 'lastN' or '3,5,7'."""
    text = spec.strip().lower()
    if text == "all":
        return None
    if match := re.fullmatch(r"last(\d+)", text):
        count = int(match.group(1))
        if count < 1:
            raise TreeLoraUsageError(f"--layers {spec!r} names no layer.")
        return None if count >= num_layers else list(range(num_layers - count, num_layers))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise TreeLoraUsageError(f"--layers {spec!r}: give 'all', 'lastN' or a comma list like '3,5,7'.") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise TreeLoraUsageError(f"--layers {spec!r}: this model has layers 0 to {num_layers - 1}.")
    return layers


def target_module_names(spec: str, model: torch.nn.Module) -> list[str]:
    """Short names of the Linear modules inside the numbered layers ('all-linear'), or the named ones."""
    available = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name):
            short = name.rsplit(".", 1)[-1]
            if short not in available:
                available.append(short)
    if spec.strip() == "all-linear":
        return available
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in available]
    if not wanted or unknown:
        raise TreeLoraUsageError(
            f"--target-modules: {', '.join(unknown) or 'none given'} not in this model; allowed: 'all-linear' or "
            f"a comma list of {', '.join(available)}."
        )
    return wanted


def _check_fits(model: torch.nn.Module, *blocks: torch.Tensor) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(b.shape[1] for b in blocks)
    if isinstance(limit, int) and longest > limit:
        raise TreeLoraUsageError(f"a document has {longest} tokens, more than the model's context of {limit}.")


# --- progress -------------------------------------------------------------------------------------------------


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


# --- outputs --------------------------------------------------------------------------------------------------


def results_table(data: dict[str, Any]) -> str:
    rows = [
        "| arm | held-out recall | seen-paraphrase recall | held-out loss | active params / token | "
        "trainable params | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in data["arms"]:
        flag = " (interrupted)" if run["interrupted"] else ""
        rows.append(
            f"| {run['label']}{flag} | {run['recall_held_out']:.1%} ({run['facts_recalled']}/{data['facts']}) | "
            f"{run['recall_seen_paraphrase']:.1%} | {run['held_out_loss']:.3f} | "
            f"{run['active_params_per_token']:,} | {run['trainable_params']:,} | {run['train_seconds']:.0f} s |"
        )
    return "\n".join(rows)


def noise(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two recall rates over `n` facts each (a rough guide: the arms
    answer the same facts, so this overstates the noise of a paired comparison a little)."""
    return 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))


def verdict(data: dict[str, Any]) -> str:
    """Plain sentences, one per comparison: is the setting capacity-bound (LoRA r vs LoRA r*2**d), where does the
    tree stand against each LoRA, and which differences are within noise (two standard errors)."""
    runs = {run["key"]: run for run in data["arms"]}
    settings = data["settings"]
    small, wide = runs.get(f"lora_r{settings['rank']}"), runs.get(f"lora_r{settings['rank'] * 2 ** settings['depth']}")
    tree, matched = runs.get("tree"), runs.get("compute_matched")
    facts = data["facts"]
    lines = []

    def compared(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
        gap = a["recall_held_out"] - b["recall_held_out"]
        margin = noise(a["recall_held_out"], b["recall_held_out"], facts)
        word = f"{gap:.1%} more" if gap > 0 else f"{-gap:.1%} fewer" if gap < 0 else "as many"
        if abs(gap) < margin:
            word += f" (within noise: 2 s.e. = {margin:.0%} on {facts} facts)"
        return gap, margin, word

    if small and wide:
        gap, margin, word = compared(wide, small)
        bound = "capacity-bound" if gap >= max(margin, 0.05) else "NOT clearly capacity-bound"
        lines.append(
            f"- {wide['label']} recalls {word} held-out facts than {small['label']} "
            f"({wide['recall_held_out']:.1%} vs {small['recall_held_out']:.1%}): at LoRA r={settings['rank']} this "
            f"setting is {bound}."
        )
    if tree:
        for other in (small, matched, wide):
            if other is None:
                continue
            _, _, word = compared(tree, other)
            lines.append(
                f"- {tree['label']} ({tree['active_params_per_token']:,} params active per token) recalls {word} "
                f"held-out facts than {other['label']} ({other['active_params_per_token']:,} per token): "
                f"{tree['recall_held_out']:.1%} vs {other['recall_held_out']:.1%}; held-out loss "
                f"{tree['held_out_loss']:.3f} vs {other['held_out_loss']:.3f}."
            )
    if data["arms"]:
        best_seen = max(run["recall_seen_paraphrase"] for run in data["arms"])
        if best_seen < 0.9:
            lines.append(
                f"- No arm memorised every fact (best seen-paraphrase recall {best_seen:.0%}): the run is limited by "
                "its steps as well as by adapter capacity."
            )
    return "\n".join(lines)


def write_outputs(data: dict[str, Any], results: Sequence[RunResult], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    data["plots"] = plots = {}
    if results:
        from .report import plot_leaf_usage, plot_losses

        _atomic_plot(lambda path: plot_recall(data, path), output / RECALL_PLOT)
        _atomic_plot(lambda path: plot_losses(results, path), output / LOSS_PLOT)
        plots.update(recall=RECALL_PLOT, held_out_loss=LOSS_PLOT)
    tree = next((r for r, run in zip(results, data["arms"]) if run["kind"] == "tree" and r.leaf_usage), None)
    if tree is not None:
        _atomic_plot(lambda path: plot_leaf_usage(tree, path), output / LEAF_PLOT)
        plots["leaf_usage"] = LEAF_PLOT
    _atomic_text(output / RESULTS_FILE, json.dumps(data, indent=1) + "\n")
    _atomic_text(output / REPORT_FILE, report_markdown(data))


def report_markdown(data: dict[str, Any]) -> str:
    settings = data["settings"]
    wide = settings["rank"] * 2 ** settings["depth"]
    matched = data["compute_matched"]
    layers = data["layers"]
    lines = [
        "# Synthetic facts: LoRA vs TreeLoRA",
        "",
        f"- **command**: `{data['command']}`",
        f"- **model**: {data['model']}",
        f"- **facts**: {data['people']} synthetic people x {len(data['attributes'])} facts = {data['facts']} facts "
        "the model cannot know (random names and values); four paraphrases per fact; training shows three of them "
        f"({settings['epochs']} short biographies per person, one statement per fact, the paraphrase rotating), "
        "recall is asked in the fourth, which training never showed for that person",
        f"- **training** (every arm): {data['steps']} steps x {settings['batch_size']} documents "
        f"(up to {data['documents']['train'][1]} tokens, padded), AdamW, lr {data['learning_rate']:g} "
        f"with {int(data['steps'] * settings['warmup_fraction'])} warm-up steps and linear decay, seed "
        f"{settings['seed']}",
        f"- **adapters**: {', '.join(data['target_modules'])} in "
        + (f"layers {', '.join(map(str, layers))}" if layers else "every layer")
        + f"; alpha = 2 x rank; tree: depth {settings['depth']}, rank {settings['rank']}, token routing, hard "
        "training routing (trains the served function), hard at evaluation",
        f"- **compute-matched LoRA**: the tree touches {matched['tree_active_per_token']:,} adapter parameters "
        f"per token (one leaf per module plus the {settings['depth']} routers on its path); LoRA has "
        f"{matched['lora_params_per_rank']:,} parameters per rank, so rank {matched['rank']} is the smallest "
        "with at least as many",
        f"- **base model before training**: {data['base_recall_held_out']:.1%} held-out-paraphrase recall",
        f"- **machine**: {data['machine']}",
        f"- **wall time**: {data['wall_seconds'] / 60:.1f} min (loading, training and evaluating every run)",
        "",
    ]
    selection = data["lr_selection"]
    if selection:
        lines += [
            "## Learning rate (chosen on validation people)",
            "",
            f"LoRA r={settings['rank']} and LoRA r={wide} were trained at each rate on "
            f"{selection['validation_people']} validation people (other names and facts than the test people); "
            f"the rate with the best mean validation recall is used for every arm: **{selection['chosen']:g}**.",
            "",
            "| lr | arm | validation held-out recall | held-out loss |",
            "| ---: | --- | ---: | ---: |",
        ]
        lines += [
            f"| {r['lr']:g} | {r['arm']} | {r['recall_held_out']:.1%} | {r['held_out_loss']:.3f} |"
            for r in selection["rows"]
        ]
        lines.append("")
    else:
        lines += [
            f"The learning rate {data['learning_rate']:g} was chosen beforehand with `--lr-sweep` on validation "
            "people (see the job module's docstring), not on these test people.",
            "",
        ]
    if not data["arms"]:
        return "\n".join(lines)
    lines += ["## Results", "", results_table(data), "", data["verdict"], ""]
    lines += [
        "Recall is exact match of the value and its full stop, greedy, with the prompt fed in (one forward pass). "
        "Held-out loss is the mean next-token loss on documents stating each person's facts in the held-out "
        "paraphrases (padding included, the same for every arm). Train times are wall-clock on a shared "
        "machine; they say little.",
        "",
        "## Recall by fact",
        "",
        "| arm | " + " | ".join(data["attributes"]) + " |",
        "| --- | " + " | ".join("---:" for _ in data["attributes"]) + " |",
    ]
    for run in data["arms"]:
        accuracy = run["accuracy_by_attribute"]
        lines.append(f"| {run['label']} | " + " | ".join(f"{accuracy[a]:.0%}" for a in data["attributes"]) + " |")
    lines += [
        "",
        f"![recall per arm]({RECALL_PLOT})",
        "",
        "## Held-out loss",
        "",
        f"![held-out loss]({LOSS_PLOT})",
        "",
    ]
    if "leaf_usage" in data["plots"]:
        lines += [
            "## Leaf usage of the tree",
            "",
            "Share of held-out tokens each leaf serves, per layer (hard routing).",
            "",
            f"![leaf usage]({LEAF_PLOT})",
            "",
        ]
    return "\n".join(lines)


def plot_recall(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["arms"]
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    positions = range(len(runs))
    width = 0.38
    held = [100 * run["recall_held_out"] for run in runs]
    seen = [100 * run["recall_seen_paraphrase"] for run in runs]
    axes.bar([p - width / 2 for p in positions], held, width, label="held-out paraphrase")
    axes.bar([p + width / 2 for p in positions], seen, width, label="seen paraphrase", alpha=0.6)
    for p, value in zip(positions, held):
        axes.text(p - width / 2, value + 1, f"{value:.0f}%", ha="center", fontsize=8)
    labels = [f"{run['label']}\n{run['active_params_per_token']:,} / token" for run in runs]
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.set_ylabel("exact-match recall (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"Recall of {data['facts']} synthetic facts ({data['people']} people)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def _atomic_plot(draw: Callable[[Path], Any], path: Path) -> None:
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        draw(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_marker(output: Path, command: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    _atomic_text(output / COMMAND_FILE, json.dumps({"command": command, "job": "facts"}, indent=2) + "\n")


def _layers_text(layers: list[int] | None) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if layers else "every layer"


def machine_description() -> str:
    processor = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.system()} {processor}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load:.1f} at the end"
    )


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft-tree-lora": __version__,
    }


if __name__ == "__main__":
    sys.exit(main())
