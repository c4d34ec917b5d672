"""The main job: teach a pretrained model synthetic facts it cannot know, and compare how well four adapters of the
same shape family store them.

N synthetic people (names never seen together, facts drawn at random) each have four facts; every fact has four
paraphrases. Training shows short biographies (one statement per fact, three of the four paraphrases, rotating
with the epoch); recall is asked in the fourth paraphrase, which training never showed for that person (it shows
it for other people). Compared, with the same optimiser, steps, learning rate, batch, seed and target modules:

- LoRA r (default r=1);
- TreeLoRA depth d, rank r (default d=3: 8 leaves of rank 1), the config's defaults: block routing (one router per
  transformer block) and hard training routing, routers at the recommended ratio (8x for rank-1 block routing);
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
SmolLM2: the block-routed tree touches 47,628 parameters per token (40,704 in its leaf, 6,924 in its routers: one
tree of 3 x 577 per block), LoRA has 40,704 per rank, so rank 2. (A token-routed tree, the default before 0.3,
touches 100,692, so rank 3.)

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
import json
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..tuner.errors import TreeLoraUsageError
from . import facts_data
from .cli.models import number_of_layers, parse_layers, target_modules
from .cli.runs import COMMAND_FILE, claimed_output_dir, machine_description
from .facts_report import REPORT_FILE, atomic_text, layers_text, results_table, verdict, versions, write_outputs
from .facts_runs import (  # noqa: F401  (JobSettings, compute_matched_rank ... are this job's API)
    ARM_KEYS,
    QUERY_BATCH,
    ROUTINGS,
    Arm,
    JobSettings,
    ProgressLine,
    _check_fits,
    _quiet_warnings,
    _Say,
    _train_settings,
    adapter_config,
    compute_matched,
    compute_matched_rank,
    copies_of,
    job_arms,
    load_model,
    recall,
    sweep_learning_rate,
)
from .people import ATTRIBUTES, VALUE_COUNTS, generate_people
from .report import require_matplotlib
from .runner import RunResult, run_training

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
    group.add_argument(
        "--routing", choices=ROUTINGS, default=defaults.routing, help="the tree's routing scope (default: block)"
    )
    group.add_argument(
        "--router-lr-ratio",
        type=float,
        default=None,
        help="the tree's routers learn at --lr times this (default: for block routing 8 up to rank 2, 1/8 from "
        "rank 8; 2 otherwise)",
    )
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
        routing=args.routing,
        router_lr_ratio=args.router_lr_ratio,
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
    require_matplotlib("tree-lora facts")
    output = Path(args.output_dir).expanduser()
    argv = getattr(args, "argv", None)
    if getattr(args, "command", None) and argv is not None:  # a tree-lora sub-command: argv starts with its name
        command = "tree-lora " + shlex.join(argv)
    else:
        command = shlex.join(["python", "-m", "peft_tree_lora.app.facts_job", *(argv or sys.argv[1:])])
    with claimed_output_dir(output, args.overwrite):
        data = run_job(settings, output, command, show_progress=not args.quiet)
    if data["arms"]:
        print("\n" + results_table(data))
        print(f"\n{data['verdict']}")
    print(f"\nreport: {output / REPORT_FILE}  ({data['wall_seconds'] / 60:.1f} min)")
    if any(arm["interrupted"] for arm in data["arms"]):
        print("facts_job: interrupted (the arms up to there are saved and reported)", file=sys.stderr)
        return 130
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
    names = target_modules(settings.target_modules, base)
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
        for key, arm in zip(ARM_KEYS, job_arms(settings.rank, settings.depth, matched["rank"], settings.routing))
        if key in settings.arms and not settings.sweep_only
    ]
    _write_marker(output, command)
    say(
        f"{model_description}; {settings.people} people x {len(ATTRIBUTES)} facts, {settings.epochs} biographies "
        f"each ({train_blocks.shape[0]} documents of <= {train_blocks.shape[1]} tokens); {steps} steps of "
        f"{settings.batch_size}; adapters on {', '.join(names)} in {layers_text(layers)}"
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
        "versions": versions(),
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


# --- models ---------------------------------------------------------------------------------------------------


# --- progress -------------------------------------------------------------------------------------------------


# --- outputs --------------------------------------------------------------------------------------------------


def _write_marker(output: Path, command: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    atomic_text(output / COMMAND_FILE, json.dumps({"command": command, "job": "facts"}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
