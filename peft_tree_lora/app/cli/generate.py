"""`tree-lora generate`: continue a prompt with a base model and a TreeLoRA adapter."""

from __future__ import annotations

import argparse

from ...tuner.errors import TreeLoraUsageError
from .options import float_range, int_range
from .runs import load_tree_adapter


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a folder written by `tree-lora train` or save_pretrained")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--max-new-tokens", type=int_range(1, 4096), default=40)
    parser.add_argument("--temperature", type=float_range(0.0, 100.0), default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int_range(0), default=0)


def run(args: argparse.Namespace) -> int:
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
