"""The router learning-rate sweep behind `integrations.optim.ROUTER_LR_RATIOS`, on the capacity study's set-up.

    python -m peft_tree_lora.experiments.router_sweep --routing block --rank 2 --ratios 0 0.25 1 2 8 16 32

trains one tree per ratio (0: the routers frozen at init, the study's control) and one LoRA (default: the tree's
compute-matched rank) on each seed, all at one learning rate, and prints held-out recall per seed and ratio. Run it
on exploration seeds only (the default: seed 0 and the validation seed 100); the capacity study's test seeds are
1, 2, 3 (and 4-6 for confirmations), and choosing a ratio on them would tune the study on its test split.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path
from typing import Any

import torch

from .capacity import StudyArm, matched_lora, seed_data, train_arm
from .capacity_settings import CapacitySettings
from .common import Arm, command_line, versions, write_json
from .facts_words import WordTokenizer


def tree_arms(
    settings: CapacitySettings,
    routing: str,
    ratios: list[float],
    options: dict[str, Any],
    learning_fraction: float = 1.0,
    hardening: list[float] | None = None,
) -> list[StudyArm]:
    """One tree arm per router learning-rate ratio (0 = routers frozen at init, the study's control), and per
    hardening-loss weight when `hardening` lists some."""
    arms = []
    for ratio in ratios:
        for weight in hardening or [None]:
            key = "frozen" if ratio == 0 else f"ratio{ratio:g}"
            label = f"tree, routers {'frozen' if ratio == 0 else f'at {ratio:g}x'}"
            tree_options = (("routing", routing), *options.items())
            if weight is not None:
                key, label = f"{key}-hardening{weight:g}", f"{label}, hardening {weight:g}"
                tree_options += (("hardening_loss_weight", weight),)
            tree = Arm(key, label, "tree", settings.rank, settings.depth, options=tree_options)
            # the frozen arm's ratio only makes the runner build the same AdamW as the others' (its routers are out)
            training = (("router_lr_ratio", float(ratio or 2.0)),)
            if ratio and learning_fraction < 1:
                training += (("router_learning_fraction", learning_fraction),)
            arms.append(StudyArm(tree, ("tree",), training, freeze_router=ratio == 0))
    return arms


def lora_arm(rank: int) -> StudyArm:
    return StudyArm(Arm(f"lora{rank}", f"LoRA r={rank}", "lora", rank=rank), ("lora",))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routing", choices=("token", "block", "sequence"), default="block")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--depth", type=int, default=CapacitySettings().depth)
    parser.add_argument("--people", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0, 0.25, 1, 2, 8, 16, 32])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lora-lr", type=float, default=0.02, help="the LoRA arm's rate (the study's choice)")
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="default: the tree's compute-matched rank; 0: no LoRA arm"
    )
    parser.add_argument("--option", action="append", default=[], help="TreeLoraConfig key=value for every tree")
    parser.add_argument(
        "--hardening", type=float, nargs="+", default=None, help="one tree per hardening-loss weight (and ratio)"
    )
    parser.add_argument(
        "--router-learning-fraction", type=float, default=1.0, help="routers freeze after this share of the steps"
    )
    defaults = CapacitySettings()
    for name in ("epochs", "background", "background_epochs", "hidden", "layers", "heads", "intermediate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word: a string option such as load_balance=switch
    model = {name: getattr(args, name) for name in ("epochs", "background", "background_epochs", "hidden", "layers")}
    model.update(heads=args.heads, intermediate=args.intermediate)
    model.update(people=args.people, rank=args.rank, depth=args.depth, seeds=args.seeds)
    settings = CapacitySettings(lr_grid=[args.lr], **model)
    settings.validate()
    tokenizer = WordTokenizer()
    trees = tree_arms(settings, args.routing, args.ratios, options, args.router_learning_fraction, args.hardening)
    lora_rank = matched_lora(settings, tokenizer, trees[0].arm)["rank"] if args.lora_rank is None else args.lora_rank
    arms = [lora_arm(lora_rank), *trees] if lora_rank else trees
    runs = []
    for seed in args.seeds:
        data = seed_data(settings, tokenizer, seed, False)
        for arm in arms:
            started = time.perf_counter()
            lr = args.lora_lr if arm.arm.kind == "lora" else args.lr
            run = train_arm(arm, data, lr, settings, tokenizer, False)
            seconds = time.perf_counter() - started
            kept = ("recall", "held_out_loss", "soft_minus_hard_recall", "soft_minus_hard_loss", "leaf_usage_entropy")
            keep = {**{name: run[name] for name in kept}, "seconds": seconds}
            runs.append({"seed": seed, "arm": arm.key, "label": arm.arm.label, **keep})
            gap = "" if run["soft_minus_hard_loss"] is None else f", mixed - served {run['soft_minus_hard_loss']:+.4f}"
            print(f"seed {seed}: {arm.arm.label}: held-out recall {run['recall']:.1%}{gap}", flush=True)
    print("\n| arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("| --- |" + " ---: |" * len(args.seeds))
    for arm in arms:
        cells = [next(r["recall"] for r in runs if r["seed"] == s and r["arm"] == arm.key) for s in args.seeds]
        print(f"| {arm.arm.label} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    if args.out is not None:
        given = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        record = {"command": command_line(), "versions": versions(), "args": given, "lora_rank": lora_rank}
        write_json(args.out, {**record, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
