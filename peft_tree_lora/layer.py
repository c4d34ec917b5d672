"""TreeLoRA tuner layers: the tree on a Linear/Conv1D layer, and the sequence router on the input embeddings."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TreeLoraConfig
from .context import RouteRecord, RoutingContext, masked_mean
from .leaves import apply_leaf_per_row, apply_leaf_per_sequence, apply_one_leaf, mix_leaves
from .routing import (
    attach_auxiliary_loss,
    descend,
    descend_logits,
    hardening_loss,
    load_balance_loss,
    path_probs,
    router_logits,
)


class TreeLoraLayer(BaseTunerLayer):
    """What every TreeLoRA layer holds: per adapter, its depth, routing mode and routers (heap order)."""

    adapter_layer_names: tuple[str, ...] = ("treelora_router",)
    other_param_names: tuple[str, ...] = ("depth", "routing")

    def __init__(self, base_layer: nn.Module, routing_context: RoutingContext, module_name: str) -> None:
        self.base_layer = base_layer
        self.depth: dict[str, int] = {}
        self.routing: dict[str, str] = {}
        self.treelora_router = nn.ModuleDict({})
        self.routing_context = routing_context
        self.module_name = module_name
        self._disable_adapters = False
        self.merged_adapters = []

    def _new_router(self, in_features: int, config: TreeLoraConfig) -> nn.Linear:
        router = nn.Linear(in_features, 2**config.depth - 1)
        with torch.no_grad():
            if config.router_init == "random":
                router.weight.normal_(0.0, config.router_init_scale / math.sqrt(in_features))
            else:
                router.weight.zero_()
            router.bias.zero_()
        return router

    def _record(
        self,
        adapter: str,
        leaf: torch.Tensor,
        logits: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Keep what this tree did (detached) and return its weighted auxiliary loss for a soft pass."""
        context = self.routing_context
        if context.captured_routes is not None:
            context.captured_routes[self.module_name] = leaf.detach()
        if logits is None and not context.record_eval_usage:
            return None
        record = RouteRecord(
            self.module_name, adapter, torch.bincount(leaf.detach().reshape(-1), minlength=2 ** self.depth[adapter])
        )
        aux = None
        if logits is not None:
            hardening = hardening_loss(logits)
            balance = load_balance_loss(weights)
            h_scale, b_scale = context.aux_scale(adapter)
            if h_scale or b_scale:
                aux = h_scale * hardening + b_scale * balance
            record.hardening = hardening.detach()
            record.load_balance = balance.detach()
            record.confidence = (p.detach() - 0.5).abs().mean()
        context.records[(id(self), adapter)] = record
        return aux


class TreeLoraLinear(nn.Module, TreeLoraLayer):
    """A Linear (or GPT-2 Conv1D) layer plus, per adapter, `2**depth` LoRA leaves and, for token routing, the
    routers that pick among them."""

    adapter_layer_names = ("treelora_A", "treelora_B", "treelora_router")
    other_param_names = ("depth", "routing", "r", "lora_alpha", "scaling", "treelora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: TreeLoraConfig,
        routing_context: RoutingContext,
        module_name: str,
    ) -> None:
        super().__init__()
        TreeLoraLayer.__init__(self, base_layer, routing_context, module_name)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.treelora_A = nn.ParameterDict({})
        self.treelora_B = nn.ParameterDict({})
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
        num_leaves, rank = 2**config.depth, config.r
        self.depth[adapter_name] = config.depth
        self.routing[adapter_name] = config.routing
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / rank
        self.treelora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        bound = 1.0 / math.sqrt(self.in_features)  # LoRA's kaiming-uniform(a=sqrt(5)) bound, per leaf
        lora_A = torch.empty(num_leaves, rank, self.in_features).uniform_(-bound, bound)
        if config.init_lora_weights:
            lora_B = torch.zeros(num_leaves, self.out_features, rank)
        else:
            lora_B = torch.empty(num_leaves, self.out_features, rank).uniform_(
                -1 / math.sqrt(rank), 1 / math.sqrt(rank)
            )
        self.treelora_A[adapter_name] = nn.Parameter(lora_A)
        self.treelora_B[adapter_name] = nn.Parameter(lora_B)
        if config.routing == "token" and config.depth > 0:
            self.treelora_router[adapter_name] = self._new_router(self.in_features, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.treelora_A:
                continue
            delta, aux = self._tree_output(x, adapter)
            result = result + delta.to(result.dtype)
            if aux is not None:
                result = attach_auxiliary_loss(result, aux)
        return result

    def _tree_output(self, x: torch.Tensor, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        lora_A, lora_B = self.treelora_A[adapter], self.treelora_B[adapter]
        x = self._cast_input_dtype(x, lora_A.dtype)
        leaf_input = self.treelora_dropout[adapter](x)
        scaling = self.scaling[adapter]
        depth = self.depth[adapter]
        if depth == 0:
            return apply_one_leaf(leaf_input, lora_A[0], lora_B[0], scaling), None
        context = self.routing_context
        soft = self.training or context.soft_inference.get(adapter, False)
        if self.routing[adapter] == "sequence":
            return self._sequence_routed(x, leaf_input, adapter, soft, scaling), None

        flat_x = x.reshape(-1, self.in_features)
        flat_input = leaf_input.reshape(-1, self.in_features)
        router = self.treelora_router[adapter]
        if soft:
            logits = router_logits(flat_x, router.weight, router.bias)
            p = torch.sigmoid(logits)
            weights = path_probs(p, depth)
            delta = mix_leaves(flat_input, lora_A, lora_B, weights, scaling)
            aux = None
            if self.training or context.record_eval_usage or context.captured_routes is not None:
                leaf = descend_logits(logits.detach(), depth).view(x.shape[:-1])
                aux = self._record(adapter, leaf, logits, p, weights)
        else:
            leaf = descend(flat_x, router.weight, router.bias, depth)
            delta = apply_leaf_per_row(flat_input, lora_A, lora_B, leaf, scaling)
            aux = self._record(adapter, leaf.view(x.shape[:-1]))
        return delta.view(*x.shape[:-1], self.out_features), aux

    def _sequence_routed(
        self, x: torch.Tensor, leaf_input: torch.Tensor, adapter: str, soft: bool, scaling: float
    ) -> torch.Tensor:
        context = self.routing_context
        pinned = context.pinned_leaf.get(adapter)
        lora_A, lora_B = self.treelora_A[adapter], self.treelora_B[adapter]
        if pinned is not None:
            return apply_one_leaf(leaf_input, lora_A[pinned], lora_B[pinned], scaling)
        if adapter not in context.sequence_leaf:
            raise RuntimeError(
                f"TreeLoRA adapter '{adapter}' routes by sequence, but no route was computed for this batch. Call the "
                "model itself (with input_ids or inputs_embeds), not one of its inner modules."
            )
        if x.dim() != 3 or x.shape[0] != context.sequence_leaf[adapter].shape[0]:
            raise RuntimeError(
                f"Sequence-routed layer {self.module_name} got input of shape {tuple(x.shape)}, but the batch was "
                f"routed with {context.sequence_leaf[adapter].shape[0]} sequences."
            )
        if soft:
            # The route is recomputed here from the (constant) pooled embeddings rather than shared as a tensor:
            # under gradient checkpointing this layer runs again in backward, and a shared non-leaf route tensor
            # would be back-propagated once per layer through a graph that reentrant checkpointing frees after the
            # first. Cost: batch x (2**d - 1) x hidden per layer, next to batch x tokens x in x out for the layer.
            router = context.sequence_router.treelora_router[adapter]
            logits = router_logits(context.pooled[adapter], router.weight, router.bias)
            weights = path_probs(torch.sigmoid(logits), self.depth[adapter]).to(leaf_input.dtype)
            return mix_leaves(leaf_input, lora_A, lora_B, weights.unsqueeze(1), scaling)
        return apply_leaf_per_sequence(leaf_input, lora_A, lora_B, context.sequence_leaf[adapter], scaling)

    # --- merging ----------------------------------------------------------------------------------------------

    def mergeable_leaf(self, adapter: str) -> int:
        """The single leaf that this adapter applies to every input, or a ValueError saying why there is none."""
        if self.depth[adapter] == 0:
            return 0
        pinned = self.routing_context.pinned_leaf.get(adapter)
        if pinned is not None:
            return pinned
        raise ValueError(
            f"TreeLoRA adapter '{adapter}' has depth {self.depth[adapter]}: its {2 ** self.depth[adapter]} leaves are "
            "chosen per input, so no single weight update equals it. Merge works for depth 0, or after pinning one "
            "leaf of a sequence-routed adapter with `model.base_model.pin_leaf(k)`."
        )

    def get_delta_weight(self, adapter: str, leaf: int | None = None) -> torch.Tensor:
        leaf = self.mergeable_leaf(adapter) if leaf is None else leaf
        delta = self.treelora_B[adapter][leaf] @ self.treelora_A[adapter][leaf] * self.scaling[adapter]
        return delta.T if self.is_conv1d else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.treelora_A:
                continue
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infinities detected when merging TreeLoRA adapter '{adapter}'.")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def __repr__(self) -> str:
        return "treelora." + super().__repr__()


class TreeLoraSequenceRouter(nn.Module, TreeLoraLayer):
    """Wraps the input embeddings of a model whose adapters route by sequence.

    Its output is the embedding output, unchanged. On the side it pools each sequence's embeddings over its
    non-padding positions and descends the routers (one per inner node, in heap order), once per sequence, for
    every target module of the model.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: TreeLoraConfig,
        routing_context: RoutingContext,
        module_name: str,
    ) -> None:
        super().__init__()
        TreeLoraLayer.__init__(self, base_layer, routing_context, module_name)
        weight = self.get_base_layer().weight
        self.hidden_size = weight.shape[1]
        self._active_adapter = adapter_name
        routing_context.sequence_router = self
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: TreeLoraConfig) -> None:
        self.depth[adapter_name] = config.depth
        self.routing[adapter_name] = config.routing
        self.treelora_router[adapter_name] = self._new_router(self.hidden_size, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeds = self.base_layer(input_ids, *args, **kwargs)
        if self.disable_adapters:
            return embeds
        due, attention_mask = self.routing_context.take_route_request()
        if due:
            embeds = self.route(embeds, attention_mask)
        return embeds

    def route(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Choose every active adapter's leaf for each sequence of `embeds` (`B, T, H`); returns `embeds`, with the
        routers' auxiliary loss attached in training."""
        context = self.routing_context
        pooled = masked_mean(embeds.detach(), attention_mask)
        for adapter in self.active_adapters:
            if adapter not in self.treelora_router:
                continue
            router = self.treelora_router[adapter]
            depth = self.depth[adapter]
            context.pooled[adapter] = pooled
            logits = router_logits(pooled, router.weight, router.bias)
            leaf = descend_logits(logits.detach(), depth)
            pinned = context.pinned_leaf.get(adapter)
            if pinned is not None:
                leaf = torch.full_like(leaf, pinned)
            context.sequence_leaf[adapter] = leaf
            if self.training or context.soft_inference.get(adapter, False):
                p = torch.sigmoid(logits)
                aux = self._record(adapter, leaf, logits, p, path_probs(p, depth))
                if aux is not None:
                    embeds = attach_auxiliary_loss(embeds, aux)
            else:
                self._record(adapter, leaf)
        return embeds

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Nothing to merge: the router does not change the embeddings."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def __repr__(self) -> str:
        return "treelora." + super().__repr__()
