"""`tree-lora compare`: LoRA r, TreeLoRA depth d rank r and LoRA r*2**d trained on the same data, steps and seed,
side by side in report.md."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ...tuner.errors import TreeLoraUsageError
from .models import load_base
from .options import add_run_options
from .runs import (
    adapter_settings,
    claimed_output_dir,
    lora_config,
    machine_description,
    token_blocks,
    train_settings,
    tree_config,
    write_command,
)
from .train import INTERRUPTED


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    parser.add_argument("--output-dir", "-o", default="runs/compare", help="folder for report.md, plots, adapters")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier tree-lora output there")


def run(args: argparse.Namespace) -> int:
    from ..report import require_matplotlib

    if args.depth < 1:
        raise TreeLoraUsageError(
            "compare needs --depth >= 1 (depth 0 is a plain LoRA; there would be nothing to compare)."
        )
    require_matplotlib("tree-lora compare")  # before the output folder is claimed and anything is trained
    output = Path(args.output_dir).expanduser()
    with claimed_output_dir(output, args.overwrite):
        return _compare(args, output)


def _compare(args: argparse.Namespace, output: Path) -> int:
    from ...tuner.routing import num_leaves
    from ..data import load_corpus
    from ..report import results_table, write_report
    from ..runner import run_training

    started = time.perf_counter()
    settings = train_settings(args)
    corpus = load_corpus(args.data)
    model, tokenizer, model_description = load_base(args.model)
    shared = adapter_settings(args, model)
    train_blocks, eval_blocks = token_blocks(args, tokenizer, corpus)
    alpha_per_rank = (args.alpha / args.rank) if args.alpha is not None else 2.0
    big_rank = args.rank * num_leaves(args.depth)
    runs = [
        (f"LoRA r={args.rank}", f"lora-r{args.rank}", lora_config(args.rank, alpha_per_rank * args.rank, shared)),
        (f"TreeLoRA d={args.depth} r={args.rank}", f"treelora-d{args.depth}-r{args.rank}", tree_config(args, shared)),
        (f"LoRA r={big_rank}", f"lora-r{big_rank}", lora_config(big_rank, alpha_per_rank * big_rank, shared)),
    ]
    write_command(output, args)
    results = []
    for index, (name, folder, config) in enumerate(runs):
        print(f"\n[{index + 1}/{len(runs)}] {name}", flush=True)
        base = model if index == 0 else load_base(args.model, verbose=False)[0]
        result = run_training(name, base, train_blocks, eval_blocks, settings, config, output_dir=output / folder)
        result.model = None
        results.append(result)
        if result.interrupted:
            break
    wall = time.perf_counter() - started
    layers = shared.get("layers_to_transform")
    setup = {
        "command": "`tree-lora " + shlex.join(args.argv) + "`",
        "base model": model_description,
        "data": f"{corpus.description}; fixed held-out split, {eval_blocks.shape[0]} held-out blocks",
        "training": f"{args.steps} steps x {args.batch_size} blocks x {args.seq_len} tokens "
        f"({args.steps * args.batch_size * args.seq_len:,} tokens), lr {args.lr}, {args.warmup_steps} warm-up steps, "
        f"linear decay, seed {args.seed}, held-out loss every {settings.eval_every} steps",
        "adapters": f"{', '.join(shared['target_modules'])} in "
        + (f"layers {layers[0]}-{layers[-1]}" if layers else "every layer")
        + f"; alpha = {alpha_per_rank:g} x rank for every run (same scaling); tree routing: {args.routing}, "
        f"hard at evaluation",
        "machine": machine_description(),
        "wall time": f"{wall / 60:.1f} min (loading, tokenising, training and evaluating all runs)",
        "timing caveat": "train times are wall-clock, measured one run after another; on a machine shared with "
        "other work they and their ratios say little",
    }
    report = write_report(results, output, setup, reference=runs[0][0], tree_name=runs[1][0])
    (output / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    print("\n" + results_table(results, reference=runs[0][0]))
    print(f"\nreport: {report}  ({wall / 60:.1f} min)")
    if results[-1].interrupted:
        print("tree-lora: interrupted (the runs up to there are saved and reported)", file=sys.stderr)
        return INTERRUPTED
    return 0
