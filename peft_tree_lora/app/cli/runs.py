"""What `train` and `compare` share (and `inspect` and `generate` read back): the output folder and its record of
the command, the adapter configs and training settings built from the options, the token blocks, and loading a
trained TreeLoRA adapter."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from pathlib import Path
from typing import Any

from ...integrations.files import tree_adapter_config
from ...tuner.errors import TreeLoraUsageError
from . import one_line
from .claim import COMMAND_FILE, check_output_dir, claimed_output_dir  # noqa: F401  (re-exported for the runs)
from .models import load_base, max_positions, number_of_layers, parse_layers, target_modules


def write_command(path: Path, args: argparse.Namespace) -> None:
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "tree-lora " + shlex.join(args.argv),
        "model": args.model,
        "data": getattr(args, "data", None),
    }
    (path / COMMAND_FILE).write_text(json.dumps(record, indent=2) + "\n")


def adapter_settings(args: argparse.Namespace, model) -> dict[str, Any]:
    """What every adapter of a run shares: target modules, layers, dropout."""
    if args.seq_len > max_positions(model):
        raise TreeLoraUsageError(
            f"--seq-len {args.seq_len} is longer than the model's context ({max_positions(model)} tokens)."
        )
    settings: dict[str, Any] = {
        "target_modules": target_modules(args.target_modules, model),
        "lora_dropout": args.dropout,
    }
    layers = parse_layers(args.layers, number_of_layers(model))
    if layers is not None:
        settings["layers_to_transform"] = layers
    return settings


def tree_config(args: argparse.Namespace, shared: dict[str, Any]):
    from ...tuner.config import TreeLoraConfig

    try:
        return TreeLoraConfig(
            depth=args.depth,
            r=args.rank,
            lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
            routing=args.routing,
            training_routing=args.training_routing,
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
    from ..data import tokenize_blocks

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
    from ...integrations.optim import router_lr_ratio_for
    from ..runner import TrainSettings

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
        router_lr_ratio=router_lr_ratio_for(args.routing, args.rank, args.router_lr_ratio),
    )


def machine_description() -> str:
    import torch

    processor = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    system = platform.system()
    return f"{system} {processor}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({threads} threads)"


def load_tree_adapter(adapter: str, model_spec: str | None):
    """(PeftModel in eval mode, tokenizer, adapter config dict) for a TreeLoRA adapter folder; refuses others."""
    folder = Path(adapter).expanduser()
    config = tree_adapter_config(
        folder, repr(adapter), remedy="tree-lora inspect and generate read TreeLoRA adapters only."
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
            f"cannot load the adapter {adapter!r} onto {model_spec!r}: {one_line(str(error))}"
        ) from None
    return model.eval(), tokenizer, config
