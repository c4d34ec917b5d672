"""`tree-lora train`: train a TreeLoRA adapter on a base model and save it (optionally pushing it to the Hub)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...tuner.errors import TreeLoraUsageError
from . import one_line
from .models import load_base
from .options import add_run_options, int_range
from .runs import adapter_settings, claimed_output_dir, token_blocks, train_settings, tree_config, write_command

INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    parser.add_argument(
        "--output-dir", "-o", required=True, help="folder for the adapter (new, empty, or --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier tree-lora output in --output-dir")
    parser.add_argument("--save-every", type=int_range(1), default=None, help="save the adapter every N steps")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the adapter to this Hub repo")


def run(args: argparse.Namespace) -> int:
    """Train and save into --output-dir, held by this run from the first check to the last save. Exit status 0,
    or 130 when Ctrl-C stopped the run (what was trained up to there is saved)."""
    output = Path(args.output_dir).expanduser()
    with claimed_output_dir(output, args.overwrite):
        return _train(args, output)


def _train(args: argparse.Namespace, output: Path) -> int:
    from ...tuner.routing import num_leaves
    from ..data import load_corpus
    from ..report import layer_usage
    from ..runner import run_training

    settings = train_settings(args, save_every=args.save_every or args.eval_every)
    corpus = load_corpus(args.data)
    model, tokenizer, model_description = load_base(args.model)
    shared = adapter_settings(args, model)
    config = tree_config(args, shared)
    train_blocks, eval_blocks = token_blocks(args, tokenizer, corpus)

    write_command(output, args)
    name = f"TreeLoRA d={args.depth} r={args.rank}"
    print(f"{name} on {model_description}; data: {corpus.description}", flush=True)
    result = run_training(name, model, train_blocks, eval_blocks, settings, config, output_dir=output)

    start_loss = result.eval_curve[0][2]
    print(
        f"\n{name}{' (interrupted)' if result.interrupted else ''}: {result.steps_done} steps, "
        f"{result.eval_curve[-1][1]:,} tokens, {result.train_seconds:.0f} s of training"
    )
    print(
        f"held-out loss {start_loss:.4f} -> {result.final_eval_loss:.4f}  (perplexity {result.final_perplexity:.2f})"
    )
    print(
        f"adapter parameters: {result.trainable_params:,} trained, {result.active_params_per_token:,} active per token"
    )
    if result.leaf_usage:
        labels, fractions = layer_usage(result.leaf_usage)
        busiest = [max(row) for row in fractions]
        print(
            f"leaf usage: the busiest leaf serves {min(busiest):.0%}-{max(busiest):.0%} of tokens per layer "
            f"({num_leaves(args.depth)} leaves; uniform would be {1 / num_leaves(args.depth):.0%})"
        )
    print(f"saved to {output}")
    if result.interrupted:
        print("tree-lora: interrupted (the adapter trained so far is saved)", file=sys.stderr)
        return INTERRUPTED
    if args.push_to_hub:
        _push(result.model, args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")
    return 0


def _push(model, repo_id: str) -> None:
    from ...integrations.hub import push_to_hub

    try:
        push_to_hub(model, repo_id)
    except TreeLoraUsageError:
        raise
    except Exception as error:  # the Hub client raises many types; the adapter is saved locally regardless
        raise TreeLoraUsageError(
            f"the adapter was saved locally, but pushing it to {repo_id!r} failed: {one_line(str(error))}"
        ) from None
