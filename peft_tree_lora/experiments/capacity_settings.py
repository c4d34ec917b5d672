"""The capacity study's settings (`tree-lora experiment capacity` options) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tuner.errors import TreeLoraUsageError
from .capacity_variants import DEFAULT_FROZEN_ROUTER_OF, DEFAULT_TREE_ARMS, TREE_VARIANTS, variant
from .facts import FIRST_NAMES, LAST_NAMES


@dataclass
class CapacitySettings:
    """Defaults sized to finish within about 20 minutes on 2 idle CPU cores (timings in the results page).

    N=32 people (128 facts): LoRA r=1 recalls well under LoRA r=8 there (capacity-bound) while LoRA r=8 recalls
    most facts (not bound). The learning rate of every arm is chosen by one rule: the best held-out recall over
    `lr_grid` on the people of `validation_seed`, who are not the test people; the test seeds then train each arm at
    its chosen rate. Design choices (the router learning-rate ratio, the sequence prefix) were explored on seed 0,
    which is therefore not a test seed.

    The model is the facts study's word-level Llama (hidden 64, 4 layers, 4 heads, SwiGLU 176, tied embeddings,
    about 0.23 M parameters), pretrained in full on `background` other people per seed; every arm of a seed starts
    from that seed's base. 80 background epochs bring the base past memorising its own facts (it recalls 95 and 99 %
    of them on seeds 0 and 100; after 40 epochs, 29-48 %, a different point of that transition on every seed, which
    made most of the spread between seeds)."""

    people: int = 32
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    validation_seed: int = 100
    lr_grid: list[float] = field(default_factory=lambda: [0.01, 0.02])
    tree_arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_TREE_ARMS),
        metadata={
            "choices": [v.key for v in TREE_VARIANTS],
            "help": f"tree variants, of {', '.join(v.key for v in TREE_VARIANTS)}; ",
        },
    )
    frozen_router: bool = True
    frozen_router_of: list[str] = field(
        default_factory=lambda: list(DEFAULT_FROZEN_ROUTER_OF),
        metadata={
            "choices": [v.key for v in TREE_VARIANTS],
            "help": "tree arms that get a frozen-router control, of those --tree-arms runs; ",
        },
    )
    rank: int = 1
    depth: int = 3
    epochs: int = 60
    batch_size: int = 16
    background: int = 200
    background_epochs: int = 80
    base_batch_size: int = 32
    base_lr: float = 5e-3
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 176

    def validate(self) -> None:
        for name in (
            "people",
            "epochs",
            "batch_size",
            "background",
            "background_epochs",
            "base_batch_size",
            "hidden",
            "layers",
            "heads",
            "intermediate",
        ):
            if getattr(self, name) < 1:
                raise TreeLoraUsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise TreeLoraUsageError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads}).")
        if self.rank < 1 or not 1 <= self.depth <= 10:
            raise TreeLoraUsageError(f"--rank must be >= 1 and --depth in 1..10; got {self.rank}, {self.depth}.")
        if not self.lr_grid or not all(0 < lr < 1 for lr in self.lr_grid):
            raise TreeLoraUsageError(f"--lr-grid needs one or more learning rates in (0, 1); got {self.lr_grid}.")
        if not 0 < self.base_lr < 1:
            raise TreeLoraUsageError(f"--base-lr must be in (0, 1); got {self.base_lr}.")
        capacity = len(FIRST_NAMES) * len(LAST_NAMES)
        if self.background + self.people > capacity:
            raise TreeLoraUsageError(
                f"background + people must stay within the {capacity} distinct names; got "
                f"{self.background} + {self.people}."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise TreeLoraUsageError(f"--seeds needs one or more distinct seeds; got {self.seeds}.")
        if len(self.lr_grid) > 1 and self.validation_seed in self.seeds:
            raise TreeLoraUsageError(
                f"--validation-seed {self.validation_seed} is also a test seed: the learning rates would be chosen "
                "on the test people."
            )
        known = [v.key for v in TREE_VARIANTS]
        unknown = [key for key in self.tree_arms if key not in known]
        if not self.tree_arms or unknown or len(set(self.tree_arms)) != len(self.tree_arms):
            raise TreeLoraUsageError(
                f"--tree-arms needs one or more distinct names from {known}; got {self.tree_arms}."
            )
        unknown = [key for key in self.frozen_router_of if key not in known]
        if unknown:
            raise TreeLoraUsageError(f"--frozen-router-of takes names from {known}; got {unknown}.")
        grown = [key for key in self.frozen_router_of if variant(key).grown and key in self.tree_arms]
        if self.frozen_router and grown:
            raise TreeLoraUsageError(
                f"--frozen-router-of {grown[0]}: a grown tree starts without routers, so there are none to freeze."
            )
        explicit = [key for key in self.frozen_router_of if key not in DEFAULT_FROZEN_ROUTER_OF]
        missing = [key for key in explicit if key not in self.tree_arms]
        if missing or len(set(self.frozen_router_of)) != len(self.frozen_router_of):
            raise TreeLoraUsageError(
                "--frozen-router-of needs distinct tree arms that --tree-arms also runs (a control is compared with "
                f"its own trained tree); got {self.frozen_router_of} with --tree-arms {self.tree_arms}."
            )

    def controlled_trees(self) -> list[str]:
        """The tree arms that get a frozen-router control: those of `frozen_router_of` this run trains."""
        return [key for key in self.frozen_router_of if key in self.tree_arms] if self.frozen_router else []
