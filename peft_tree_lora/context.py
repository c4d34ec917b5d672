"""Per-model routing context shared by every TreeLoRA layer of one model.

It carries what one layer cannot know alone: the sequence route chosen at the input embeddings (sequence routing),
whether the current forward pass continues the sequences routed before (generation), the attention mask, and what
each tree did in the last forward pass (for the auxiliary-loss report and telemetry). It is a plain object, not a
module, so nothing in it is saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer import TreeLoraSequenceRouter


@dataclass
class RouteRecord:
    """What one tree did in the last forward pass; every tensor is detached."""

    module_name: str
    adapter: str
    leaf_counts: torch.Tensor  # (2**d,) hard leaf choices, as inference would make them
    hardening: torch.Tensor | None = None  # mean router entropy in bits (soft passes only)
    load_balance: torch.Tensor | None = None  # KL(mean leaf usage || uniform) (soft passes only)
    confidence: torch.Tensor | None = None  # mean |p - 0.5| over routers and rows (soft passes only)


class RoutingContext:
    def __init__(self) -> None:
        self.records: dict[tuple[int, str], RouteRecord] = {}
        # aux-loss weights and the number of trees that share them, per adapter (set by the tuner)
        self.aux_weights: dict[str, tuple[float, float]] = {}
        self.num_routed_trees: dict[str, int] = {}
        self.soft_inference: dict[str, bool] = {}
        self.record_eval_usage = False
        self.captured_routes: dict[str, torch.Tensor] | None = None

        # sequence routing
        self.sequence_router: TreeLoraSequenceRouter | None = None
        self.pinned_leaf: dict[str, int] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self.sequence_leaf: dict[str, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None
        self.primed = False  # the model-level hook has prepared this forward pass
        self.route_due = True
        self._routed_input_ids: torch.Tensor | None = None
        self._routed_batch: int | None = None
        self.hook_handle: torch.utils.hooks.RemovableHandle | None = None

    # --- auxiliary losses -------------------------------------------------------------------------------------

    def aux_scale(self, adapter: str) -> tuple[float, float]:
        """Per-tree weights of (hardening, load balance): the configured weights shared among the adapter's trees."""
        hardening_weight, balance_weight = self.aux_weights.get(adapter, (0.0, 0.0))
        share = max(self.num_routed_trees.get(adapter, 1), 1)
        return hardening_weight / share, balance_weight / share

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Mean hardening and load-balance terms over the trees of the last soft forward pass, and their weighted
        total (what was added to the loss)."""
        hardening, balance, total = [], [], []
        for record in self.records.values():
            if record.hardening is None:
                continue
            hardening.append(record.hardening)
            balance.append(record.load_balance)
            h_scale, b_scale = self.aux_scale(record.adapter)
            total.append(h_scale * record.hardening + b_scale * record.load_balance)
        if not total:
            return {}
        return {
            "hardening": torch.stack(hardening).mean(),
            "load_balance": torch.stack(balance).mean(),
            "total": torch.stack(total).sum(),
        }

    # --- sequence routing -----------------------------------------------------------------------------------

    def before_model_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        """Forward pre-hook on the adapted model: decide whether this pass routes anew or continues the last route.

        A pass continues the routed sequences when it reads a non-empty KV cache, or, in evaluation, when its
        `input_ids` extend the ones routed last (what `generate(use_cache=False)` does). Everything else is a new
        batch and is routed from its own prompt.
        """
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        rows = input_ids if input_ids is not None else inputs_embeds
        if rows is None:
            return None
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 calls it `cache`
        continuing = _cache_length(cache) > 0 or (not module.training and self._extends_routed(input_ids))
        self.primed = True
        if continuing and self._routed_batch == rows.shape[0]:
            self.route_due = False
            return None
        self.route_due = True
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        self._routed_input_ids = input_ids
        self._routed_batch = rows.shape[0]
        if input_ids is None and self.sequence_router is not None:
            kwargs = dict(kwargs)
            kwargs["inputs_embeds"] = self.sequence_router.route(inputs_embeds, self.attention_mask)
            self.route_due = False
            self.primed = False
            return args, kwargs
        return None

    def _extends_routed(self, input_ids: torch.Tensor | None) -> bool:
        previous = self._routed_input_ids
        if input_ids is None or previous is None or input_ids.shape[0] != previous.shape[0]:
            return False
        if input_ids.shape[1] < previous.shape[1]:
            return False
        return bool(torch.equal(input_ids[:, : previous.shape[1]], previous.to(input_ids.device)))

    def take_route_request(self) -> tuple[bool, torch.Tensor | None]:
        """Called by the sequence router at the input embeddings: (route now?, attention mask to pool with)."""
        if not self.primed:  # called without the model-level hook (e.g. on an inner module): route every call
            return True, None
        self.primed = False
        due, self.route_due = self.route_due, False
        return due, self.attention_mask


def _cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(past_key_values[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def masked_mean(embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `embeds` (`B, T, H`) over the positions where `attention_mask` (`B, T`) is non-zero."""
    if attention_mask is None or attention_mask.shape != embeds.shape[:2]:
        return embeds.mean(dim=1)
    weights = attention_mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
