"""`tree-lora inspect`: the shape, parameter counts and routing of a TreeLoRA adapter, for a text and a file."""

from __future__ import annotations

import argparse

from ...tuner.errors import TreeLoraUsageError
from .options import int_range
from .runs import load_tree_adapter

DEFAULT_TEXT = "To be, or not to be, that is the question: a list comprehension returns a new list."


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a folder written by `tree-lora train` or save_pretrained")
    parser.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="text whose routing is shown")
    parser.add_argument("--module", default=None, help="module whose per-token leaves are shown (token routing)")
    parser.add_argument("--file", default=None, help="a .txt/.jsonl file: leaf usage per layer over its text")
    parser.add_argument("--seq-len", type=int_range(2, 8192), default=64, help="block length for --file")
    parser.add_argument("--max-blocks", type=int_range(1), default=16, help="blocks of --file to route")


def run(args: argparse.Namespace) -> int:
    from ...tuner.layer import TreeLoraLinear
    from ...tuner.routing import num_leaves, num_nodes
    from ..data import load_corpus, tokenize_blocks
    from ..report import layer_usage
    from ..runner import leaf_usage

    model, tokenizer, config = load_tree_adapter(args.adapter, args.model)
    tuner = model.base_model
    depth, rank = config["depth"], config["r"]
    counts = tuner.parameter_counts()
    modules = [m.module_name for m in model.modules() if isinstance(m, TreeLoraLinear)]
    base_params = sum(p.numel() for n, p in model.named_parameters() if "treelora_" not in n)
    print(f"TreeLoRA adapter {args.adapter}")
    print(
        f"  tree: depth {depth}, {num_leaves(depth)} leaves of rank {rank}, {num_nodes(depth)} routers per tree; "
        f"routing: {config['routing']} (inference: {config.get('inference_routing', 'hard')})"
    )
    print(f"  adapted modules: {len(modules)} ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))})")
    print(
        f"  parameters: {counts['total']:,} in the adapter, {counts['active_per_token']:,} active per token; "
        f"base model {base_params:,}"
    )

    ids = tokenizer(args.text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise TreeLoraUsageError("--text is empty after tokenising; give some text.")
    routes = tuner.leaf_routes(ids)
    print(f"\nrouting of --text ({ids.shape[1]} tokens):")
    if "sequence" in routes:
        print(f"  the whole sequence takes leaf {int(routes['sequence'][0])}")
    else:
        module = args.module or next(iter(routes))
        matches = [name for name in routes if name == module or name.endswith("." + module)]
        if not matches:
            raise TreeLoraUsageError(
                f"--module {module!r} is not adapted; adapted modules include {next(iter(routes))!r}."
            )
        leaves = routes[matches[0]][0].tolist()
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
        print(f"  module {matches[0]}: token -> leaf")
        print("  " + "  ".join(f"{token!s}:{leaf}" for token, leaf in zip(tokens, leaves)))
        distinct = [len(set(route[0].tolist())) for route in routes.values()]
        print(
            f"  over all {len(routes)} modules, a module sends this text's tokens to {min(distinct)}-{max(distinct)} "
            "different leaves"
        )

    if args.file:
        corpus = load_corpus(args.file)
        blocks = tokenize_blocks(tokenizer, corpus.train + corpus.held_out, args.seq_len, max_blocks=args.max_blocks)
        if blocks.shape[0] == 0:
            raise TreeLoraUsageError(f"--file {args.file!r} has fewer than --seq-len {args.seq_len} tokens.")
        labels, fractions = layer_usage(leaf_usage(model, blocks))
        print(f"\nleaf usage over {blocks.shape[0]} blocks of {args.file} (share of tokens per leaf):")
        print("  " + " " * 12 + " ".join(f"{leaf:>6d}" for leaf in range(num_leaves(depth))))
        for label, row in zip(labels, fractions):
            print(f"  {label:<12}" + " ".join(f"{value:6.2f}" for value in row))
    return 0
