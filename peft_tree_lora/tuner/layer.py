"""`TreeLoraLinear`: a Linear (or GPT-2 Conv1D) layer plus, per adapter, `2**depth` LoRA leaves and their routers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .call import RoutingCall, current_call
from .config import TreeLoraConfig
from .leaves import apply_one_leaf
from .path_leaves import LEAF_LAYOUTS, lora_factors
from .quantized import broken_merge_error, merge_quantized, quantization, unmerge_quantized
from .router import TreeRouter
from .routing import RouterLosses, attach_auxiliary_loss, num_leaves
from .variants import ROUTING_SCOPES, TRAINING_ROUTINGS, Leaves


class TreeLoraLayer(BaseTunerLayer):
    """What every TreeLoRA tuner layer holds per adapter: its depth, its routing settings and its routers."""

    adapter_layer_names: tuple[str, ...] = ("treelora_router",)
    other_param_names: tuple[str, ...] = (
        "depth",
        "routing",
        "training_routing",
        "inference_routing",
        "router_losses",
        "pinned_leaf",
    )

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.depth: dict[str, int] = {}
        self.routing: dict[str, str] = {}
        self.training_routing: dict[str, str] = {}
        self.inference_routing: dict[str, str] = {}
        self.router_losses: dict[str, RouterLosses] = {}
        self.pinned_leaf: dict[str, int] = {}
        self.treelora_router = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []

    def _update_routing(self, adapter_name: str, config: TreeLoraConfig) -> None:
        self.depth[adapter_name] = config.depth
        self.routing[adapter_name] = config.routing
        self.training_routing[adapter_name] = config.training_routing
        self.inference_routing[adapter_name] = config.inference_routing
        self.router_losses[adapter_name] = RouterLosses(
            config.depth, config.hardening_loss_weight, config.load_balance_loss_weight, config.load_balance
        )

    @staticmethod
    def new_router(in_features: int, config: TreeLoraConfig) -> TreeRouter:
        return TreeRouter(
            in_features, config.depth, config.router_input_norm, config.router_init, config.router_init_scale
        )


class TreeLoraLinear(nn.Module, TreeLoraLayer):
    """A Linear or Conv1D layer with, per adapter, leaves A `(L, r, in)` and B `(L, out, r)` stored as stacked
    tensors (not a ModuleList, whose numbered keys PEFT's adapter-name filter would confuse with adapter names)."""

    adapter_layer_names = ("treelora_A", "treelora_B", "treelora_node_A", "treelora_node_B", "treelora_router")
    other_param_names = (
        *TreeLoraLayer.other_param_names,
        "r",
        "lora_alpha",
        "scaling",
        "treelora_dropout",
        "block_name",
        "merged_leaf",
        "leaf_layout",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TreeLoraConfig, module_name: str) -> None:
        super().__init__()
        TreeLoraLayer.__init__(self, base_layer, module_name)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.block_name: dict[str, str] = {}
        self.merged_leaf: dict[str, int] = {}
        self.kept_quantized: dict[str, tuple] = {}  # per merged adapter, the quantised base weight it replaced
        self.treelora_A = nn.ParameterDict({})
        self.treelora_B = nn.ParameterDict({})
        self.treelora_node_A = nn.ParameterDict({})  # inner nodes' LoRAs of leaf_layout="path" (path_leaves.py)
        self.treelora_node_B = nn.ParameterDict({})
        self.leaf_layout: dict[str, str] = {}
        self.treelora_dropout = nn.ModuleDict({})
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.is_conv1d = False
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.is_conv1d = True
        else:
            raise TypeError(f"TreeLoRA adapts torch.nn.Linear and transformers Conv1D layers, not {type(base)}.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: TreeLoraConfig) -> None:
        leaves, rank = num_leaves(config.depth), config.r  # rank: what a token applies, the whole path's with "path"
        self._update_routing(adapter_name, config)
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / rank
        self.treelora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.treelora_A[adapter_name], self.treelora_B[adapter_name] = lora_factors(
            leaves, config.path_ranks()[1], self.in_features, self.out_features, config.init_lora_weights
        )
        self.leaf_layout[adapter_name] = config.leaf_layout
        LEAF_LAYOUTS[config.leaf_layout].create(self, adapter_name, config)
        if config.routing in ("token", "block") and config.depth > 0:
            self.treelora_router[adapter_name] = self.new_router(self.in_features, config)
        if config.routing == "block":  # its own block until the tuner groups the modules of a model's blocks
            self.block_name[adapter_name] = self.module_name
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        call = current_call()
        for adapter in self.active_adapters:
            if adapter not in self.treelora_A:
                continue
            delta, aux = self._tree_delta(x, adapter, call)
            result = result + delta.to(result.dtype)
            if aux is not None:
                result = attach_auxiliary_loss(result, aux)
                if call is not None:
                    call.aux_losses.append(aux.detach())
        return result

    def _tree_delta(
        self, x: torch.Tensor, adapter: str, call: RoutingCall | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This adapter's change to the output for input `x`, and the routers' weighted auxiliary loss (training)."""
        lora_A, lora_B = self.leaf_factors(adapter)
        dropout = self.treelora_dropout[adapter]
        leaf_input = self._cast_input_dtype(x, lora_A.dtype)
        if not isinstance(dropout, nn.Identity):  # a module call costs what a decoding step's leaf product does
            leaf_input = dropout(leaf_input)
        fixed_leaf = 0 if self.depth[adapter] == 0 else self.pinned_leaf.get(adapter)
        if fixed_leaf is not None:
            return apply_one_leaf(leaf_input, lora_A[fixed_leaf], lora_B[fixed_leaf], self.scaling[adapter]), None
        scope = ROUTING_SCOPES[self.routing[adapter]]
        mode = TRAINING_ROUTINGS[self.training_routing[adapter]]
        soft_eval = not self.training and self.inference_routing[adapter] == "soft"
        route, aux = scope.route(self, adapter, x, call, mode.needs_logits(self.training, soft_eval))
        leaves = Leaves(lora_A, lora_B, self.scaling[adapter])
        delta = mode.delta(leaves, scope.input_rows(leaf_input, route), route, self.training, soft_eval)
        return delta.reshape(*x.shape[:-1], self.out_features), aux

    def leaf_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every leaf's LoRA as a token applies it, A `(L, r, in)` and B `(L, out, r)`: the stored leaves, or with
        `leaf_layout="path"` the sum of each path's node LoRAs (see `path_leaves`)."""
        return LEAF_LAYOUTS[self.leaf_layout.get(adapter, "leaf")].factors(self, adapter)

    # --- merging ----------------------------------------------------------------------------------------------

    def mergeable_leaf(self, adapter: str) -> int:
        """The single leaf that this adapter applies to every input, or a ValueError saying why there is none."""
        if self.depth[adapter] == 0:
            return 0
        pinned = self.pinned_leaf.get(adapter)
        if pinned is not None:
            return pinned
        raise ValueError(
            f"TreeLoRA adapter '{adapter}' has depth {self.depth[adapter]}: its {num_leaves(self.depth[adapter])} "
            "leaves are chosen per input, so no single weight update equals it. Merge works for depth 0, or after "
            "pinning one leaf of a sequence-routed adapter with `model.base_model.pin_leaf(k)`."
        )

    def get_delta_weight(self, adapter: str, leaf: int | None = None) -> torch.Tensor:
        leaf = self.mergeable_leaf(adapter) if leaf is None else leaf
        lora_A, lora_B = self.leaf_factors(adapter)
        delta = lora_B[leaf] @ lora_A[leaf] * self.scaling[adapter]
        return delta.T if self.is_conv1d else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.treelora_A:
                continue
            leaf = self.mergeable_leaf(adapter)
            delta = self.get_delta_weight(adapter, leaf)
            if quantization(base) is not None:  # bitsandbytes: dequantise, add, requantise (see quantized.py)
                merge_quantized(self.kept_quantized, base, adapter, delta, safe_merge)
            elif safe_merge:
                merged = base.weight.data + delta.to(base.weight.dtype)
                if not torch.isfinite(merged).all():
                    raise broken_merge_error(adapter)
                base.weight.data = merged
            else:
                base.weight.data += delta.to(base.weight.dtype)
            self.merged_leaf[adapter] = leaf
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract what was merged: the leaf remembered at merge time, whatever is pinned now."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            leaf = self.merged_leaf.pop(adapter, 0)
            if adapter in self.kept_quantized:  # the quantised weight this merge replaced goes back, bit for bit
                unmerge_quantized(self.kept_quantized, base, adapter)
            else:
                base.weight.data -= self.get_delta_weight(adapter, leaf).to(base.weight.dtype)

    def __repr__(self) -> str:
        return "treelora." + super().__repr__()
