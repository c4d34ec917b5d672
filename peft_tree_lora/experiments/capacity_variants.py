"""The tree arms the capacity study can run (`--tree-arms`): each a set of TreeLoraConfig arguments and runner
settings on top of the default tree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TreeVariant:
    """A tree arm: TreeLoraConfig arguments on top of the default tree (depth d, rank r, lora_alpha 2 r, every linear
    layer, the config's defaults: block routing, hard training) and runner settings (e.g. a router learning-rate
    ratio; without one, the ratio `router_lr_ratio_for` recommends for the arm's routing and rank). A new variant is
    one more line of `TREE_VARIANTS`. With `rank_times_levels` the variant's rank is the
    study's r times depth + 1, the nodes of a path: a path-layout tree then gives each node of a path rank r. With
    `rank_factor` it is the study's r times that factor (wider leaves at the same depth). A `grown` variant is
    trained as a depth-0 tree (a LoRA) and grown one level at a time (`grow_tree`, upcycling): depth + 1 stages, each
    on its share of the steps and data, with its own warm-up and decay."""

    key: str
    label: str
    config: tuple[tuple[str, Any], ...] = ()
    training: tuple[tuple[str, Any], ...] = ()
    rank_times_levels: bool = False
    rank_factor: int = 1
    grown: bool = False


ROUTERS_2X = (("router_lr_ratio", 2.0),)
ROUTERS_8X = (("router_lr_ratio", 8.0),)  # chosen on seeds 0 and 100 (not test seeds): 1/4, 1, 2, 8, 16, 32 tried
TOKEN = (("routing", "token"),)
TREE_VARIANTS: list[TreeVariant] = [
    TreeVariant("tree", "block routing, hard training, routers at the recommended ratio (the defaults)"),
    TreeVariant(
        "tree_token", "token routing, hard training, routers at 2x (the defaults before 0.3)", TOKEN, ROUTERS_2X
    ),
    TreeVariant("tree_block", "block routing, hard training, routers at 2x", (("routing", "block"),), ROUTERS_2X),
    TreeVariant("tree_block_lr8", "block routing, hard training, routers at 8x", (("routing", "block"),), ROUTERS_8X),
    TreeVariant(
        "tree_block_r2",
        "block routing, leaves of twice the rank, hard training, routers at 2x",
        (("routing", "block"),),
        ROUTERS_2X,
        rank_factor=2,
    ),
    TreeVariant(
        "tree_block_r2_lr8",
        "block routing, leaves of twice the rank, hard training, routers at 8x",
        (("routing", "block"),),
        ROUTERS_8X,
        rank_factor=2,
    ),
    TreeVariant(
        "tree_block_r3",
        "block routing, leaves of three times the rank, hard training, routers at 2x",
        (("routing", "block"),),
        ROUTERS_2X,
        rank_factor=3,
    ),
    TreeVariant(
        "tree_block_r2_grown",
        "tree_block_r2 grown from a LoRA one level at a time (upcycling)",
        (("routing", "block"),),
        ROUTERS_2X,
        rank_factor=2,
        grown=True,
    ),
    TreeVariant(
        "tree_sequence",
        "sequence routing (first 8 tokens), hard training, routers at 2x",
        (("routing", "sequence"), ("sequence_route_tokens", 8)),
        ROUTERS_2X,
    ),
    TreeVariant("tree_switch", "token routing, switch training", (*TOKEN, ("training_routing", "switch"))),
    TreeVariant(
        "tree_soft",
        "token routing, soft training (hardening 0.05), served with one leaf",
        (*TOKEN, ("training_routing", "soft"), ("hardening_loss_weight", 0.05)),
    ),
    TreeVariant(
        "tree_path",
        "path LoRA (each of a path's d+1 nodes holds r/(d+1)), token routing, hard training, routers at 2x",
        (*TOKEN, ("leaf_layout", "path")),
        ROUTERS_2X,
        rank_times_levels=True,
    ),
    TreeVariant(
        "tree_leaf_wide",
        "plain leaves (tree_path's per-token rank), token routing, hard training, routers at 2x",
        TOKEN,
        ROUTERS_2X,
        rank_times_levels=True,
    ),
]
DEFAULT_TREE_ARMS = ("tree", "tree_token", "tree_block_r2_lr8", "tree_sequence", "tree_soft")
DEFAULT_FROZEN_ROUTER_OF = ("tree", "tree_block_r2_lr8")
FROZEN_ROUTER_KEY = "tree_frozen_router"


def frozen_router_key(tree_key: str) -> str:
    """The arm key of `tree_key`'s frozen-router control (the default tree's keeps its historical name)."""
    return FROZEN_ROUTER_KEY if tree_key == "tree" else f"{tree_key}_frozen_router"


def variant(key: str) -> TreeVariant:
    return next(v for v in TREE_VARIANTS if v.key == key)
