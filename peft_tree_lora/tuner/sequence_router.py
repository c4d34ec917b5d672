"""`TreeLoraSequenceRouter`: the tuner layer on the input embeddings that picks one leaf per sequence for a call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .call import RoutingCall, SequenceRoute, current_call
from .config import TreeLoraConfig
from .layer import TreeLoraLayer
from .routing import attach_auxiliary_loss

SEQUENCE_ROUTE_NAME = "sequence"  # the module name under which sequence routes are recorded


class TreeLoraSequenceRouter(nn.Module, TreeLoraLayer):
    """Wraps the input embeddings of a model whose adapters route by sequence. Its output is the embeddings,
    unchanged; on the side, for the current call, it pools each sequence's embeddings over the positions the call
    marks as real tokens (the first `sequence_route_tokens` of them, when set) and descends the routers once per
    sequence, for every target module of the model."""

    other_param_names = (*TreeLoraLayer.other_param_names, "route_tokens")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TreeLoraConfig, module_name: str) -> None:
        super().__init__()
        TreeLoraLayer.__init__(self, base_layer, module_name)
        self.route_tokens: dict[str, int | None] = {}
        self.hidden_size = self.get_base_layer().weight.shape[1]
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def in_features(self) -> int:
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return self.hidden_size

    def update_layer(self, adapter_name: str, config: TreeLoraConfig) -> None:
        self._update_routing(adapter_name, config)
        self.route_tokens[adapter_name] = config.sequence_route_tokens
        self.treelora_router[adapter_name] = self.new_router(self.hidden_size, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeds = self.base_layer(input_ids, *args, **kwargs)
        call = current_call()
        if self.disable_adapters or call is None:  # nothing downstream reads a route outside a model call
            return embeds
        return self.route(embeds, call)

    def route(self, embeds: torch.Tensor, call: RoutingCall) -> torch.Tensor:
        """Pick every active adapter's leaf for each sequence of `embeds` (`batch, seq, hidden`) into `call`;
        returns `embeds`, with the routers' auxiliary loss attached in training."""
        for adapter in self.active_adapters:
            if adapter not in self.treelora_router:
                continue
            held = call.sequence.get(adapter) if call.hold_sequence_route else None
            if held is not None:
                if held.leaf.shape[0] != embeds.shape[0]:
                    raise RuntimeError(
                        f"This generate call routed {held.leaf.shape[0]} sequences at its first step and now runs "
                        f"{embeds.shape[0]}; a sequence-routed TreeLoRA keeps one leaf per sequence for the call."
                    )
                continue
            router = self.treelora_router[adapter]
            pooled = pooled_prefix(embeds.detach(), call.routing_mask, self.route_tokens[adapter])
            with_logits = self.training or self.inference_routing[adapter] == "soft"
            leaf, logits = router.leaf_and_logits(pooled, with_logits)
            pinned = self.pinned_leaf.get(adapter)
            if pinned is not None:
                leaf = torch.full_like(leaf, pinned)
            call.sequence[adapter] = SequenceRoute(router, pooled, leaf)
            call.record(SEQUENCE_ROUTE_NAME, adapter, leaf, logits)
            aux = self.router_losses[adapter](logits, leaf) if self.training and logits is not None else None
            if aux is not None:
                embeds = attach_auxiliary_loss(embeds, aux)
                call.aux_losses.append(aux.detach())
        return embeds

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Nothing to merge: the router does not change the embeddings."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def __repr__(self) -> str:
        return "treelora." + super().__repr__()


def pooled_prefix(embeds: torch.Tensor, mask: torch.Tensor | None, tokens: int | None) -> torch.Tensor:
    """Mean of `embeds` (`batch, seq, hidden`) over the positions `mask` (`batch, seq`) marks, keeping only the
    first `tokens` marked positions of each row when `tokens` is set (a prompt and the document it opens then pool
    the same words)."""
    if mask is None or mask.shape != embeds.shape[:2]:
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    mask = mask.to(embeds.device)
    if tokens is not None:
        mask = mask & (mask.cumsum(dim=1) <= tokens)
    weights = mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
