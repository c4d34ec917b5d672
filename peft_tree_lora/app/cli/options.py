"""Option types and the option groups that several sub-commands share (model, data, tree, training)."""

from __future__ import annotations

import argparse

DEFAULT_LAYERS = "last8"


def int_range(low: int, high: int | None = None):
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


def float_range(low: float, high: float, low_open: bool = False, high_open: bool = True):
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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct, default), a local folder or a Hub id"
    )


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="embedded",
        help="'embedded' (Python docs + Shakespeare, default), a .txt/.jsonl file, or a Hub dataset id",
    )
    group.add_argument("--seq-len", type=int_range(2, 8192), default=64, help="tokens per block (default 64)")
    group.add_argument("--eval-blocks", type=int_range(1), default=16, help="held-out blocks evaluated (default 16)")


def add_tree_options(parser: argparse.ArgumentParser) -> None:
    from ...tuner.config import MAX_DEPTH

    group = parser.add_argument_group("TreeLoRA")
    group.add_argument("--depth", type=int_range(0, MAX_DEPTH), default=3, help="tree depth; 2**depth leaves")
    group.add_argument("--rank", "-r", type=int_range(1, 4096), default=8, help="rank of every leaf")
    group.add_argument("--alpha", type=float_range(0.0, 1e6, low_open=True), default=None, help="default 2*rank")
    group.add_argument("--dropout", type=float_range(0.0, 1.0), default=0.0)
    group.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module names, or 'all-linear' (default)"
    )
    group.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help="layers to adapt: 'all', 'lastN' (default last8), 'A-B' or '3,5,7'",
    )
    group.add_argument(
        "--routing",
        choices=("token", "block", "sequence"),
        default="block",
        help="block (default): one router per transformer block; token: one per module; sequence: one leaf per text",
    )
    group.add_argument(
        "--training-routing",
        choices=("hard", "switch", "soft"),
        default="hard",
        help="hard (default): train the served function; switch; soft: mix every leaf in training",
    )
    group.add_argument("--hardening-weight", type=float_range(0.0, 1e3, high_open=False), default=0.0)
    group.add_argument("--balance-weight", type=float_range(0.0, 1e3, high_open=False), default=0.01)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int_range(1, 10_000_000), default=80)
    group.add_argument("--batch-size", type=int_range(1, 65536), default=8)
    group.add_argument("--lr", type=float_range(0.0, 1.0, low_open=True), default=2e-3, help="learning rate")
    group.add_argument(
        "--router-lr-ratio",
        type=float_range(0.0, 1e3, low_open=True, high_open=False),
        default=None,
        help="routers learn at lr times this (default: for block routing 8 up to rank 2, 1/8 from rank 8; 2 "
        "otherwise; the ratios the capacity study chose on its exploration seeds)",
    )
    group.add_argument("--warmup-steps", type=int_range(0), default=None, help="default: a tenth of --steps")
    group.add_argument("--eval-every", type=int_range(1), default=20, help="held-out loss every N steps")
    group.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What `train` and `compare` both take: model, data, tree and training options."""
    add_model_options(parser)
    add_data_options(parser)
    add_tree_options(parser)
    add_training_options(parser)
