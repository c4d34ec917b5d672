"""`TreeLoraConfig`: the validated settings of one TreeLoRA adapter."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType
from peft.utils.constants import CONFIG_NAME

from .checkpoint import WeightsSource
from .config_checks import check_config_file, check_module_fields

# 2**10 = 1024 leaves per target module. Past that the adapter outgrows any base model it is attached to
# (SmolLM2-135M with all-linear r=8 would carry ~5 G adapter parameters at depth 10) and a training batch cannot
# send enough tokens to each leaf to train it.
MAX_DEPTH = 10

ROUTING_MODES = ("token", "block", "sequence")
TRAINING_ROUTING_MODES = ("hard", "switch", "soft")
INFERENCE_ROUTING_MODES = ("hard", "soft")
ROUTER_INITS = ("random", "zeros")
LOAD_BALANCE_LOSSES = ("kl", "switch")
LEAF_LAYOUTS = ("leaf", "path")


@dataclass
class TreeLoraConfig(PeftConfig):
    """Configuration of a TreeLoRA adapter: a binary tree of LoRA leaves with a sigmoid router at each inner node.

    Each target module gets `2**depth` LoRA leaves of rank `r` and `2**depth - 1` routers in heap order (the
    children of node `n` are `2n+1` on the left, taken when `p < 0.5`, and `2n+2` on the right). Training mixes the
    default training (`training_routing="hard"`) computes what evaluation serves: each token (or sequence) descends
    the tree and applies one leaf.

    Args:
        depth: Depth of the tree. `0` is exactly one LoRA; `d` gives `2**d` leaves. At most `MAX_DEPTH` (10).
        r: Rank of every leaf.
        lora_alpha: Leaves are scaled by `lora_alpha / r`, as in LoRA.
        lora_dropout: Dropout on the leaves' input during training.
        target_modules: Modules to adapt: a list of names (exact or suffix match), a regex, or `"all-linear"`.
            Defaults to LoRA's per-architecture defaults.
        exclude_modules: Modules never to adapt (list or regex).
        layers_to_transform / layers_pattern: Restrict the adapter to some layer indices, as in LoRA.
        modules_to_save: Extra modules trained and saved in full (e.g. a classification head).
        bias: Only `"none"` is supported: TreeLoRA never trains biases.
        routing: Where a module's route comes from. `"block"` (default): one router per transformer block, on the
            block's first target module, routes each token for every target module of the block (a leaf index is
            one expert across the block; a module outside numbered blocks routes on its own). `"token"`: every
            target module routes each token by its own input (more routers, and it stored fewer facts in the
            capacity study). `"sequence"`:
            one leaf per sequence, chosen once from the mean of its input token embeddings and shared by every
            target module; in `generate()` the leaf chosen from the prompt holds for every new token of that call.
        training_routing: How training applies the leaves. `"hard"` (default): the forward pass is the one that is
            served (one leaf per token or sequence, only that leaf learns from it), and the routers learn through a
            straight-through estimate of the soft mix. `"switch"`: the chosen leaf scaled by its path probability,
            in training and serving (Switch Transformer's top-1 gate; training computes one leaf, not all).
            `"soft"`: every leaf mixed by its path probability (served with one leaf: kept to measure that gap).
        inference_routing: `"hard"` (default) serves one leaf at evaluation; `"soft"` mixes all leaves (slower;
            useful to measure the gap between the two).
        router_input_norm: The routers read their input divided by its RMS (no parameters), so that their logits do
            not depend on the scale of the layer's activations.
        router_init: `"random"` draws router weights from N(0, (router_init_scale / sqrt(in_features))**2) so that
            tokens spread over the leaves from the start (with `router_input_norm`, logits of spread about
            `router_init_scale`); `"zeros"` starts every router at p = 0.5.
        router_init_scale: Scale of the random router initialisation.
        hardening_loss_weight: Weight, per tree, of the mean Bernoulli entropy of the router decisions (in bits),
            which pushes every `p` towards 0 or 1: what soft training needs to be served hard (0.05 is a start).
            Default 0: hard training serves what it trains, and saturated routers stop learning.
        load_balance_loss_weight: Weight, per tree, of the load-balance loss, smallest when leaves are used evenly.
        load_balance: `"kl"`: KL(mean soft leaf usage || uniform). `"switch"`: Switch Transformer's
            `L * sum_k f_k P_k - 1` (hard share times mean path probability), which also sees hard collapse.
        sequence_route_tokens: With sequence routing, pool only the first this many real tokens of each sequence
            (`None`: all of them), so that a document in training and the prompt that opens it at inference are
            routed from the same words.
        leaf_layout: `"leaf"` (default): only the leaf carries a LoRA, of rank `r`. `"path"`: every node on a token's
            path carries a small LoRA, the inner nodes of rank `path_node_rank` and the leaf of the rest of `r`, and
            a token applies their sum, a LoRA of rank `r` (the same per-token compute as a `"leaf"` tree of rank
            `r`); the root is shared by every token, deeper nodes by fewer.
        path_node_rank: With `leaf_layout="path"`, the rank of each inner node's LoRA; the leaf gets
            `r - depth * path_node_rank`, which must be >= 1. `None` (default): `r // (depth + 1)`, so the leaf gets
            the remainder too.
        init_lora_weights: `True` starts each leaf's B at zero, so a fresh adapter leaves the model unchanged.
            `False` draws B at random too (for tests).
    """

    depth: int = field(default=3, metadata={"help": f"Tree depth, 0..{MAX_DEPTH}; 2**depth leaves."})
    r: int = field(default=8, metadata={"help": "Rank of every leaf."})
    lora_alpha: float = field(default=16, metadata={"help": "Leaf scaling is lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the leaves' input, in [0, 1)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names, a regex, or 'all-linear'. Defaults to LoRA's per-model defaults."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Adapt only these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h'), with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full besides the tree."}
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "Only 'none' is supported."})
    routing: Literal["token", "block", "sequence"] = field(
        default="block",
        metadata={"help": "'block': per token, one router per block (default); 'token': per module; 'sequence'."},
    )
    training_routing: Literal["hard", "switch", "soft"] = field(
        default="hard",
        metadata={"help": "'hard': train the served leaf (straight-through routers); 'switch'; 'soft': mix all."},
    )
    inference_routing: Literal["hard", "soft"] = field(
        default="hard", metadata={"help": "'hard': one leaf at evaluation; 'soft': mix all leaves."}
    )
    router_input_norm: bool = field(default=True, metadata={"help": "Routers read their input divided by its RMS."})
    router_init: Literal["random", "zeros"] = field(
        default="random", metadata={"help": "'random' (spread tokens from the start) or 'zeros' (p = 0.5)."}
    )
    router_init_scale: float = field(default=1.0, metadata={"help": "Scale of the random router init, > 0."})
    hardening_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight, per tree, of the router-entropy (hardening) loss, >= 0."}
    )
    load_balance_loss_weight: float = field(
        default=0.01, metadata={"help": "Weight of the leaf load-balance loss, >= 0."}
    )
    load_balance: Literal["kl", "switch"] = field(
        default="kl", metadata={"help": "'kl': KL of soft usage from uniform; 'switch': Switch's f * P."}
    )
    sequence_route_tokens: int | None = field(
        default=None, metadata={"help": "Sequence routing pools only the first this many tokens (None: all)."}
    )
    init_lora_weights: bool = field(
        default=True, metadata={"help": "True: B starts at zero (no change to the model). False: random B."}
    )
    leaf_layout: Literal["leaf", "path"] = field(
        default="leaf",
        metadata={"help": "'leaf': a LoRA of rank r per leaf; 'path': every node of the path carries part of r."},
    )
    path_node_rank: int | None = field(
        default=None,
        metadata={"help": "With leaf_layout='path': rank of each inner node's LoRA (None: r // (depth + 1))."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TREELORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def to_dict(self) -> dict:
        """As PEFT's, with sets of module names as sorted lists: a set's order varies between processes (string
        hashing is salted), so without this one adapter saved twice could write two different config files."""
        data = super().to_dict()
        for key, value in data.items():
            if isinstance(value, set):
                data[key] = sorted(value)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load as PEFT does, and remember where from, so that the weights can be checked before injection."""
        local = os.path.join(str(pretrained_model_name_or_path), subfolder or "", CONFIG_NAME)
        if os.path.isfile(local):
            check_config_file(local)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (json.JSONDecodeError, TypeError, KeyError) as error:  # a downloaded config that is not TreeLoRA's
            raise ValueError(
                f"adapter_config.json in {pretrained_model_name_or_path} is not a TreeLoRA config: "
                f"{type(error).__name__}: {error}"
            ) from None
        if isinstance(config, TreeLoraConfig):
            download_kwargs, _, _ = cls._split_kwargs(kwargs)
            download_kwargs.pop("subfolder", None)
            config._weights_source = WeightsSource(str(pretrained_model_name_or_path), subfolder, download_kwargs)
        return config

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    def path_ranks(self) -> tuple[int, int]:
        """(rank of each inner node, rank of each leaf): `(0, r)` for the `"leaf"` layout and for depth 0."""
        if self.leaf_layout != "path" or self.depth == 0:
            return 0, self.r
        node_rank = self.r // (self.depth + 1) if self.path_node_rank is None else self.path_node_rank
        return node_rank, self.r - self.depth * node_rank

    def _validate(self) -> None:
        check_module_fields(self)
        _require_int("depth", self.depth, low=0, high=MAX_DEPTH)
        _require_int("r", self.r, low=1)
        _require_number("lora_alpha", self.lora_alpha, positive=True)
        _require_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TreeLoraConfig.lora_dropout must be in [0, 1); got {self.lora_dropout!r}.")
        _require_choice("routing", self.routing, ROUTING_MODES)
        _require_choice("training_routing", self.training_routing, TRAINING_ROUTING_MODES)
        _require_choice("load_balance", self.load_balance, LOAD_BALANCE_LOSSES)
        if not isinstance(self.router_input_norm, bool):
            raise ValueError(
                f"TreeLoraConfig.router_input_norm must be True or False; got {self.router_input_norm!r}."
            )
        if self.sequence_route_tokens is not None:
            _require_int("sequence_route_tokens", self.sequence_route_tokens, low=1)
        _require_choice("inference_routing", self.inference_routing, INFERENCE_ROUTING_MODES)
        _require_choice("router_init", self.router_init, ROUTER_INITS)
        _require_choice("bias", self.bias, ("none",))
        _require_number("router_init_scale", self.router_init_scale, positive=True)
        _require_number("hardening_loss_weight", self.hardening_loss_weight, non_negative=True)
        _require_number("load_balance_loss_weight", self.load_balance_loss_weight, non_negative=True)
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(
                f"TreeLoraConfig.init_lora_weights must be True or False; got {self.init_lora_weights!r}."
            )
        self._validate_path_layout()
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "TreeLoraConfig.layers_to_transform cannot be used when target_modules is a regex string; "
                "give target_modules as a list of names instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("TreeLoraConfig.layers_pattern needs layers_to_transform to be set as well.")

    def _validate_path_layout(self) -> None:
        _require_choice("leaf_layout", self.leaf_layout, LEAF_LAYOUTS)
        if self.path_node_rank is not None:
            _require_int("path_node_rank", self.path_node_rank, low=1)
            if self.leaf_layout != "path":
                raise ValueError(
                    "TreeLoraConfig.path_node_rank is the rank of the inner nodes' LoRAs of leaf_layout='path'; "
                    f"leaf_layout is {self.leaf_layout!r}. Set leaf_layout='path' or leave path_node_rank at None."
                )
        if self.leaf_layout != "path" or self.depth == 0:
            return
        levels = self.depth + 1
        if self.path_node_rank is None and self.r < levels:
            raise ValueError(
                f"TreeLoraConfig.r must be >= depth + 1 = {levels} with leaf_layout='path': the rank r is split over "
                f"the {levels} nodes of a path (each inner node r // (depth + 1), the leaf the rest); got r={self.r}."
            )
        node_rank, leaf_rank = self.path_ranks()
        if leaf_rank < 1:
            raise ValueError(
                f"TreeLoraConfig.path_node_rank must leave the leaf a rank >= 1 with leaf_layout='path': r - depth * "
                f"path_node_rank = {self.r} - {self.depth} * {node_rank} = {leaf_rank}; use path_node_rank <= "
                f"{(self.r - 1) // self.depth} or a larger r."
            )


def _require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"TreeLoraConfig.{name} must be {allowed}; got {value!r}.")
    if value < low or (high is not None and value > high):
        raise ValueError(f"TreeLoraConfig.{name} must be {allowed}; got {value}.")


def _require_number(name: str, value: object, positive: bool = False, non_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TreeLoraConfig.{name} must be a finite number; got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"TreeLoraConfig.{name} must be > 0; got {value}.")
    if non_negative and value < 0:
        raise ValueError(f"TreeLoraConfig.{name} must be >= 0; got {value}.")


def _require_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"TreeLoraConfig.{name} must be one of {list(allowed)}; got {value!r}.")
